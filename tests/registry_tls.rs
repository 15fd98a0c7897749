//! `https://` downloads into the model cache, against a TLS server started by the test on
//! 127.0.0.1 with certificates the test generates: one from a CA the registry is told to
//! trust, one from a CA it does not know.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use sha2::{Digest as _, Sha256};
use starling::model::gguf_writer::{TinyLlamaSpec, tiny_llama_f32};
use starling::registry::{Digest, HttpUrl, ModelCache, Origin, trust_pem};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA and a `localhost` / `127.0.0.1` server certificate it signed.
struct Pki {
    ca_pem: String,
    server: ServerConfig,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    Pki { ca_pem: ca_cert.pem(), server }
}

/// Serves `body` to every GET over TLS on a free port of 127.0.0.1; returns the port.
fn serve_tls(server: ServerConfig, body: Vec<u8>) -> u16 {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    std::thread::spawn(move || {
        runtime.block_on(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, body) = (acceptor.clone(), body.clone());
                tokio::spawn(async move {
                    // A failed handshake (an untrusting client) just ends this connection.
                    let Ok(mut tls) = acceptor.accept(stream).await else { return };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"tls\"\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.write_all(&body).await;
                    let _ = tls.shutdown().await;
                });
            }
        })
    });
    port
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("registry-tls").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

#[test]
fn https_downloads_verify_the_server_certificate() {
    let body = tiny_llama_f32(&TinyLlamaSpec { seed: 42, ..TinyLlamaSpec::default() });
    let digest = Digest::of(Sha256::new_with_prefix(&body));

    // A server whose CA nobody trusts: the handshake fails and nothing is cached.
    let stranger = pki();
    let port = serve_tls(stranger.server, body.clone());
    let dir = scratch("untrusted");
    let cache = ModelCache::new(&dir, 64 << 20);
    let url = HttpUrl::parse(&format!("https://localhost:{port}/m.gguf")).unwrap();
    let err = block_on(cache.fetch(&url, Some(&digest), &[])).unwrap_err().to_string();
    assert!(err.contains("TLS handshake with localhost"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(cache.entries().unwrap().is_empty());

    // A server whose CA is trusted: downloaded, verified, cached.
    let known = pki();
    assert_eq!(trust_pem(known.ca_pem.as_bytes()).unwrap(), 1);
    let port = serve_tls(known.server, body.clone());
    let dir = scratch("trusted");
    let cache = ModelCache::new(&dir, 64 << 20);
    let url = HttpUrl::parse(&format!("https://localhost:{port}/m.gguf")).unwrap();
    let fetched = block_on(cache.fetch(&url, Some(&digest), &[])).expect("the https download works");
    assert_eq!(fetched.origin, Origin::Downloaded);
    assert_eq!(std::fs::read(&fetched.path).unwrap(), body);
    assert_eq!(cache.entries().unwrap()[0].etag.as_deref(), Some("\"tls\""));
}
