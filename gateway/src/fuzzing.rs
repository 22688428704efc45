//! Entry points for the fuzz targets in `gateway/fuzz` (cargo fuzz): each feeds arbitrary bytes to the code
//! that reads what clients send, the way the gateway itself calls it. Not part of the gateway's API.

use crate::auth::{authenticate_client, read_first_packet, Credentials, FirstPacket};
use crate::config::Config;
use crate::protocol;
use std::sync::{Arc, OnceLock};

/// What the targets share: a configuration with SCRAM and md5 users, a classifier, a runtime.
struct Fixture {
    scram: Credentials,
    md5: Credentials,
    classifier: Arc<crate::route::Classifier>,
    runtime: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let config = |method: &str| {
            Config::parse(
                &format!(
                    "primary: postgres://127.0.0.1:5432/app\n\
                     auth: {{ method: {method}, users: [ {{ name: app, password: secret }} ] }}\n"
                ),
                "fuzz",
            )
            .expect("a valid configuration")
        };
        Fixture {
            scram: Credentials::new(&config("scram-sha-256")),
            md5: Credentials::new(&config("md5")),
            classifier: crate::route::Classifier::new(&[]),
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime"),
        }
    })
}

/// A stream of client messages after startup: framing, then the decoders of every message the gateway
/// inspects (Query text and its statements, Parse, Bind, Describe, Close), as the session runs them.
pub fn frontend_messages(data: &[u8]) {
    let tables = vec!["events".to_string()];
    let mut rest = data;
    while let Some(header) = protocol::peek_header(rest) {
        let Ok((tag, len)) = header else { return };
        let Some(message) = rest.get(..len) else {
            return;
        };
        rest = &rest[len..];
        let body = protocol::body(message);
        match tag {
            b'Q' => {
                if let Some(text) = protocol::query_text(body) {
                    statements(text);
                    for range in crate::sql::split(text) {
                        let _ = crate::sql::classify(text, range);
                    }
                    let _ = crate::batch::analyze(text, &tables);
                }
            }
            b'P' => {
                if let Some((_, after)) = protocol::cstr(body) {
                    if let Some((text, _)) = protocol::cstr(after) {
                        let _ = crate::batch::analyze(text, &tables);
                    }
                }
            }
            _ => {}
        }
    }
    crate::session::fuzz_extended(data);
}

/// A statement text through the classifier, the fingerprints and the batching reader.
pub fn statements(text: &[u8]) {
    let fixture = fixture();
    let shape = crate::fingerprint::shape_id(text);
    assert_eq!(shape.hash, crate::fingerprint::shape(text).hash);
    // Two texts (split at the first NUL) that differ only in numbers must have one shape.
    if let Some(nul) = memchr::memchr(0, text) {
        let (a, b) = (&text[..nul], &text[nul + 1..]);
        if crate::fingerprint::same_but_numbers(a, b) {
            assert_eq!(
                crate::fingerprint::shape_id(a),
                crate::fingerprint::shape_id(b),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }
    // The session's short way must not skip a statement it has to track.
    if crate::sql::plainly_other(&shape) {
        for range in crate::sql::split(text) {
            assert_eq!(
                crate::sql::classify(text, range),
                crate::sql::Kind::Other,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }
    let _ = fixture.classifier.classify_shaped(text, shape.hash);
    let _ = crate::fingerprint::canonical(text);
    let _ = crate::batch::analyze(text, &["events".to_string(), "s.t".to_string()]);
}

/// The startup exchange: first packets (SSLRequest, CancelRequest, StartupMessage), then authentication with
/// SCRAM or md5 (chosen by the first byte), against what the client sends.
pub fn startup(data: &[u8]) {
    let Some((&choice, data)) = data.split_first() else {
        return;
    };
    let fixture = fixture();
    let credentials = if choice & 1 == 0 {
        &fixture.scram
    } else {
        &fixture.md5
    };
    fixture.runtime.block_on(async {
        let mut stream = tokio::io::join(data, tokio::io::sink());
        let mut offer_tls = choice & 2 == 0;
        loop {
            match read_first_packet(&mut stream, offer_tls).await {
                Ok(FirstPacket::Startup(startup)) => {
                    let _ = authenticate_client(&mut stream, credentials, &startup).await;
                    return;
                }
                Ok(FirstPacket::Tls) => offer_tls = false,
                _ => return,
            }
        }
    });
}
