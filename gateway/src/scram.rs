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

/// HMAC-SHA-256 (RFC 2104).
fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(data).into()
}

/// What logs in to a server as a user whose password the gateway never saw: the ClientKey a client proved
/// it holds when it logged in, with the verifier it was checked against (RFC 5802). Enough to answer a SCRAM
/// exchange whose salt and iterations are the verifier's, as PgBouncer does with `auth_query` users.
#[derive(Clone)]
pub struct ScramKeys {
    pub client_key: [u8; 32],
    verifier: ScramVerifier,
}

impl ScramVerifier {
    /// The ClientKey a successful SCRAM exchange proved, from its three messages: `client_first` (with its
    /// GS2 header), `server_first`, and `client_final` (with the proof). None when they do not fit this
    /// verifier.
    pub fn recover_keys(
        &self,
        client_first: &[u8],
        server_first: &[u8],
        client_final: &[u8],
    ) -> Option<ScramKeys> {
        // client-first-message = gs2-cbind-flag "," [authzid] "," client-first-message-bare
        let mut commas = client_first.iter().enumerate().filter(|(_, b)| **b == b',');
        commas.next()?;
        let (bare_at, _) = commas.next()?;
        let bare = &client_first[bare_at + 1..];
        let proof_at = memchr::memmem::rfind(client_final, b",p=")?;
        let without_proof = &client_final[..proof_at];
        let proof = STANDARD.decode(&client_final[proof_at + 3..]).ok()?;
        let auth_message = [bare, b",", server_first, b",", without_proof].concat();
        let signature = hmac(&self.stored_key, &auth_message);
        let client_key: [u8; 32] = proof
            .iter()
            .zip(signature)
            .map(|(p, s)| p ^ s)
            .collect::<Vec<u8>>()
            .try_into()
            .ok()?;
        (sha256(&client_key)[..] == self.stored_key[..]).then(|| ScramKeys {
            client_key,
            verifier: self.clone(),
        })
    }
}

/// The client side of a SCRAM-SHA-256 exchange with a server, from [`ScramKeys`] instead of a password.
pub struct KeyedScramClient {
    keys: ScramKeys,
    gs2_header: String,
    channel_binding: Vec<u8>,
    nonce: String,
    client_first_bare: String,
    auth_message: Option<Vec<u8>>,
    /// The server proved it holds the verifier (its final message checked).
    pub verified: bool,
}

impl KeyedScramClient {
    /// `channel`: the GS2 header and the channel-binding data (`n,,` and none without TLS).
    pub fn new(keys: ScramKeys, gs2_header: &str, channel_binding: Vec<u8>) -> KeyedScramClient {
        let nonce = STANDARD.encode(rand::random::<[u8; 18]>());
        KeyedScramClient {
            keys,
            gs2_header: gs2_header.to_string(),
            channel_binding,
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            auth_message: None,
            verified: false,
        }
    }

    /// The SASLInitialResponse's data.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.gs2_header, self.client_first_bare).into_bytes()
    }

    /// The answer to the server's first message, or why there is none.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, String> {
        let text =
            std::str::from_utf8(server_first).map_err(|_| "a SCRAM message that is not UTF-8")?;
        let field = |name: &str| {
            text.split(',')
                .find_map(|f| f.strip_prefix(name))
                .ok_or_else(|| format!("the server's SCRAM message has no {name} field"))
        };
        let nonce = field("r=")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err("the server's SCRAM nonce does not extend ours".into());
        }
        let salt = STANDARD
            .decode(field("s=")?)
            .map_err(|_| "the server's SCRAM salt is not base64")?;
        let iterations: usize = field("i=")?
            .parse()
            .map_err(|_| "the server's SCRAM iteration count is not a number")?;
        let verifier = &self.keys.verifier;
        if salt != verifier.salt || iterations != verifier.iterations {
            return Err("the server's SCRAM salt or iteration count is not that of the password the client \
                        logged in with (was the password changed?)"
                .into());
        }
        let binding = STANDARD.encode([self.gs2_header.as_bytes(), &self.channel_binding].concat());
        let without_proof = format!("c={binding},r={nonce}");
        let auth_message = [
            self.client_first_bare.as_bytes(),
            b",",
            server_first,
            b",",
            without_proof.as_bytes(),
        ]
        .concat();
        let signature = hmac(&verifier.stored_key, &auth_message);
        let proof: Vec<u8> = self
            .keys
            .client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes())
    }

    /// Checks the server's final message: it proves the server holds the verifier too.
    pub fn verify(&mut self, server_final: &[u8]) -> Result<(), String> {
        let auth_message = self
            .auth_message
            .as_ref()
            .ok_or("a SCRAM final message before the exchange")?;
        let text =
            std::str::from_utf8(server_final).map_err(|_| "a SCRAM message that is not UTF-8")?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(format!("the server refused the SCRAM exchange: {error}"));
        }
        let signature = text
            .strip_prefix("v=")
            .and_then(|v| STANDARD.decode(v).ok())
            .ok_or("the server's SCRAM final message has no signature")?;
        let expected = hmac(&self.keys.verifier.server_key, auth_message);
        if signature[..] == expected[..] {
            self.verified = true;
            Ok(())
        } else {
            Err("the server's SCRAM signature is wrong".into())
        }
    }
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

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            mac.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// A client logs in with its password (postgres-protocol's SCRAM client against pgwire's server); the keys
    /// recovered from that exchange then log in to another server holding the same verifier.
    #[test]
    fn keys_recovered_from_a_login_answer_another_exchange() {
        use pgwire::api::auth::sasl::scram::ScramServerAuth;
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let verifier =
            parse_scram_verifier(&postgres_protocol::password::scram_sha_256(b"pw")).unwrap();
        let exchange = |password: &[u8]| {
            let mut client = ScramSha256::new(password, ChannelBinding::unsupported());
            let client_first = client.message().to_vec();
            let (server_first, waiting) = ScramServerAuth::new()
                .on_client_first_message_with_secret(
                    &bytes::Bytes::from(client_first.clone()),
                    verifier.secret(),
                )
                .unwrap();
            client.update(server_first.as_bytes()).unwrap();
            let client_final = client.message().to_vec();
            let accepted = waiting.on_client_final_message(&client_final).is_ok();
            (accepted, client_first, server_first, client_final)
        };
        let (accepted, first, server_first, last) = exchange(b"pw");
        assert!(accepted);
        let keys = verifier
            .recover_keys(&first, server_first.as_bytes(), &last)
            .expect("the keys of a good proof");
        let (accepted, first, server_first, last) = exchange(b"wrong");
        assert!(!accepted);
        assert!(verifier
            .recover_keys(&first, server_first.as_bytes(), &last)
            .is_none());

        // Log in with the keys to a server holding the verifier.
        let mut client = KeyedScramClient::new(keys, "n,,", Vec::new());
        let (server_first, waiting) = ScramServerAuth::new()
            .on_client_first_message_with_secret(
                &bytes::Bytes::from(client.client_first()),
                verifier.secret(),
            )
            .unwrap();
        let client_final = client.client_final(server_first.as_bytes()).unwrap();
        let server_final = waiting
            .on_client_final_message(&client_final)
            .expect("the server accepts the keys");
        client.verify(server_final.as_bytes()).unwrap();
        assert!(client.verify(b"v=AAAA").is_err());
    }
}
