//! SCRAM-SHA-256 verifiers: the form PostgreSQL stores passwords in (`pg_authid`), parsed from the
//! configuration or derived from a clear-text password. Configuration validation parses them and
//! authentication checks logins against them; a leaf that both use, importing nothing from the crate.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramSecret};

/// A SCRAM-SHA-256 verifier as PostgreSQL stores it: what the server needs to check a client proof.
#[derive(Clone)]
pub struct ScramVerifier {
    salt: Vec<u8>,
    iterations: usize,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl ScramVerifier {
    /// Derives a verifier from a clear-text password with a fresh random salt (4096 iterations, as PostgreSQL).
    pub fn from_password(password: &str) -> ScramVerifier {
        let salt: [u8; 16] = rand::random();
        let salted = gen_salted_password(password, &salt, 4096);
        match ScramSecret::verifier_from_salted_password(salt.to_vec(), salted, 4096) {
            ScramSecret::Verifier {
                salt,
                iterations,
                stored_key,
                server_key,
            } => ScramVerifier {
                salt,
                iterations,
                stored_key,
                server_key,
            },
            ScramSecret::SaltedPassword { .. } => {
                unreachable!("verifier_from_salted_password returns a verifier")
            }
        }
    }

    /// The verifier in pgwire's form, for its SCRAM server.
    pub fn secret(&self) -> ScramSecret {
        ScramSecret::Verifier {
            salt: self.salt.clone(),
            iterations: self.iterations,
            stored_key: self.stored_key.clone(),
            server_key: self.server_key.clone(),
        }
    }
}

/// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts), the `pg_authid` format.
pub fn parse_scram_verifier(text: &str) -> Result<ScramVerifier, String> {
    let bad = || {
        "not a SCRAM verifier (SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"
            .to_string()
    };
    let rest = text.strip_prefix("SCRAM-SHA-256$").ok_or_else(bad)?;
    let (params, keys) = rest.split_once('$').ok_or_else(bad)?;
    let (iterations, salt) = params.split_once(':').ok_or_else(bad)?;
    let (stored_key, server_key) = keys.split_once(':').ok_or_else(bad)?;
    let decode = |s: &str| STANDARD.decode(s).map_err(|_| bad());
    let verifier = ScramVerifier {
        iterations: iterations.parse().map_err(|_| bad())?,
        salt: decode(salt)?,
        stored_key: decode(stored_key)?,
        server_key: decode(server_key)?,
    };
    if verifier.stored_key.len() != 32
        || verifier.server_key.len() != 32
        || verifier.iterations == 0
    {
        return Err(bad());
    }
    Ok(verifier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_text_round_trip() {
        let text = postgres_protocol::password::scram_sha_256(b"secret");
        let verifier = parse_scram_verifier(&text).unwrap();
        assert_eq!(verifier.iterations, 4096);
        assert!(parse_scram_verifier("SCRAM-SHA-256$4096:abc").is_err());
        assert!(parse_scram_verifier("md5abc").is_err());
    }
}
