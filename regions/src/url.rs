//! Server URLs as the configuration writes them.

use std::fmt;

/// The parts of a `postgres://user:password@host:port/database` URL that a server connection needs.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ServerUrl {
    pub host: String,
    pub port: u16,
    pub database: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for ServerUrl {
    // Never print the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self)
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl ServerUrl {
    pub fn parse(text: &str) -> Result<ServerUrl, String> {
        if !text.contains("://") {
            // `127.0.0.1:5433` reads as a relative URL, `localhost:5433` as a URL of scheme `localhost`.
            return Err(format!(
                "invalid server URL {text:?}: write it with its scheme, as postgres://{text}/DATABASE"
            ));
        }
        let url = url::Url::parse(text).map_err(|e| format!("invalid server URL: {e}"))?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(format!(
                "invalid server URL: scheme must be postgres://, not {}://",
                url.scheme()
            ));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("invalid server URL: no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let decode = |s: &str| {
            url::form_urlencoded::parse(s.as_bytes())
                .map(|(k, v)| {
                    if v.is_empty() {
                        k
                    } else {
                        format!("{k}={v}").into()
                    }
                })
                .collect::<String>()
        };
        let database = url.path().trim_start_matches('/');
        Ok(ServerUrl {
            host,
            port: url.port().unwrap_or(5432),
            database: (!database.is_empty()).then(|| decode(database)),
            user: (!url.username().is_empty()).then(|| decode(url.username())),
            password: url.password().map(decode),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_its_scheme_is_told_so() {
        for text in ["127.0.0.1:5433", "localhost:5433", "db.example"] {
            let error = ServerUrl::parse(text).unwrap_err();
            assert!(error.contains("write it with its scheme"), "{error}");
            assert!(error.contains(&format!("postgres://{text}/")), "{error}");
        }
    }

    #[test]
    fn url_forms() {
        let url = ServerUrl::parse("postgres://u:p%40ss@db.example:6000/app").unwrap();
        assert_eq!(url.host, "db.example");
        assert_eq!(url.port, 6000);
        assert_eq!(url.user.as_deref(), Some("u"));
        assert_eq!(url.password.as_deref(), Some("p@ss"));
        assert_eq!(format!("{url:?}"), "db.example:6000");
        assert!(ServerUrl::parse("mysql://h/x").is_err());
        assert_eq!(ServerUrl::parse("postgresql://h").unwrap().port, 5432);
    }
}
