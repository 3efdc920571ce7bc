//! An HTTPS upstream whose certificate is signed by a private CA: trusted through
//! `tls.extra_ca_file`, refused without it; HTTP/2 negotiated by ALPN.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

struct Pki {
    ca_pem: String,
    acceptor: tokio_rustls::TlsAcceptor,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ctxgate test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Pki {
        ca_pem: ca.pem(),
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
    }
}

#[tokio::test]
async fn https_upstream_with_extra_ca_and_h2() {
    let pki = pki();
    let up = mock_with_tls(
        |_| Reply::json("{\"tls\":true}"),
        Some(pki.acceptor.clone()),
    )
    .await;
    let dir = TempDir::new("tls");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let upstream = format!("https://127.0.0.1:{}/v1/", up.addr.port());

    let gate = TestConfig::one("/v1/", &upstream, "openai")
        .set_route("tls", "extra_ca_file", ca_file.display().to_string())
        .start()
        .await;
    let (s, _, b) = send(
        "POST",
        &gate.url("/v1/chat/completions"),
        &[("authorization", "Bearer sk-1")],
        "{\"a\":1}",
    )
    .await;
    assert_eq!(s, 200, "{b:?}");
    assert_eq!(b, Bytes::from_static(b"{\"tls\":true}"));
    let got = up.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].version, http::Version::HTTP_2, "ALPN should pick h2");
    assert_eq!(
        got[0].uri,
        format!("https://127.0.0.1:{}/v1/chat/completions", up.addr.port())
    );
    assert_eq!(got[0].body, Bytes::from_static(b"{\"a\":1}"));
    assert_eq!(got[0].headers["authorization"], "Bearer sk-1");

    // Without the CA the certificate is refused and nothing reaches the upstream.
    let gate2 = TestConfig::one("/v1/", &upstream, "openai").start().await;
    let (s, _, b) = send("POST", &gate2.url("/v1/chat/completions"), &[], "{}").await;
    assert_eq!(s, 502);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("could not be reached") && msg.to_lowercase().contains("certificate"),
        "{msg}"
    );
    assert_eq!(up.requests().len(), 1);
}
