//! `[[client]]`: keys, their lifecycle, JWT callers, and when no client is configured.

use super::*;

#[test]
fn anonymous_on_a_public_address_is_refused() {
    let text = format!("[server]\nlisten = \"0.0.0.0:8080\"\n{GENESYS}");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("allow_anonymous"), "{err}");
    let ok = format!("[server]\nlisten = \"0.0.0.0:8080\"\nallow_anonymous = true\n{GENESYS}");
    assert!(load(&ok).is_ok());
}

#[test]
fn client_authentication_keys_are_checked_together() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key_file = dir.path().join("k.pem");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let k = key_file.display();
    let cases: Vec<(String, &str)> = vec![
        // Genesys and CXone take secrets only.
        (GENESYS.replace("client_secret = \"${SECRET}\"", &format!("auth_method = \"private_key_jwt\"\nprivate_key_file = \"{k}\"")), "only valid for provider = \"oauth2\""),
        (format!("{OAUTH2}auth_method = \"private_key_jwt\"\n"), "private_key_file: is required"),
        (format!("{OAUTH2}auth_method = \"private_key_jwt\"\nprivate_key_file = \"{k}\"\nsigning_alg = \"RS256\"\n"), "not a PEM RSA private key"),
        (format!("{OAUTH2}auth_method = \"private_key_jwt\"\nprivate_key_file = \"{k}\"\nclient_secret = \"s\"\n"), "client_secret: is not used"),
        (format!("{OAUTH2}client_secret = \"s\"\nkey_id = \"k1\"\n"), "key_id: is only used with auth_method = \"private_key_jwt\""),
        (format!("{OAUTH2}auth_method = \"tls_client_auth\"\n"), "client_cert_file: is required"),
        (format!("{OAUTH2}client_secret = \"s\"\nclient_cert_file = \"{k}\"\n"), "set both client_cert_file and client_key_file"),
        (format!("{OAUTH2}client_secret = \"s\"\nca_only = true\n"), "ca_only: needs ca_file"),
        (format!("{OAUTH2}client_secret = \"s\"\nca_file = \"{k}\"\n"), "holds no PEM certificate"),
        ("[[upstream]]\nname = \"idp\"\nprovider = \"oauth2\"\nbase_url = \"https://api.example.com\"\nclient_id = \"x\"\nclient_secret = \"s\"\n".to_string(), "or issuer, to find it by discovery"),
        (GENESYS.replace("client_id", "issuer = \"https://x\"\nclient_id"), "only valid for provider = \"cxone\" or \"oauth2\""),
    ];
    for (text, expected) in cases {
        let e = load(&text).unwrap_err().to_string();
        assert!(e.contains(expected), "{expected:?} not in: {e}");
    }
    let ok = load(&format!(
        "{OAUTH2}auth_method = \"private_key_jwt\"\nprivate_key_file = \"{k}\"\nsigning_alg = \"ES256\"\nkey_id = \"k1\"\n"
    ))
    .unwrap();
    let g = &ok.upstreams[0].grant;
    assert_eq!(g.auth_method, AuthMethod::PrivateKeyJwt);
    assert!(g.client_secret.is_none());
    let issuer = load(&OAUTH2.replace(
        "token_url = \"https://idp.example.com/token\"",
        "issuer = \"https://idp.example.com/t1/\"\nclient_secret = \"s\"",
    ))
    .unwrap();
    assert_eq!(issuer.upstreams[0].grant.token_url, None);
    assert_eq!(
        issuer.upstreams[0].grant.issuer.as_deref(),
        Some("https://idp.example.com/t1")
    );
}

#[test]
fn client_keys_have_a_lifecycle() {
    let client = |keys: &str| load(&format!("{GENESYS}\n[[client]]\nname = \"c\"\n{keys}\n"));
    let (a, b) = ("ab".repeat(32), "cd".repeat(32));
    // Both forms of a moment: TOML's own and a string.
    let c = client(&format!(
        "key_sha256 = \"{a}\"\nkeys = [{{ sha256 = \"{b}\", not_after = 2027-03-01T00:00:00Z }}, {{ sha256 = \"{}\", not_after = \"2027-04-01T12:00:00+02:00\" }}]",
        "ef".repeat(32)
    ))
    .unwrap();
    let keys = &c.clients[0].keys;
    assert_eq!(keys.len(), 3);
    assert_eq!(keys[0].not_after, None);
    assert_eq!(
        keys[1].not_after.map(crate::config::rfc3339).as_deref(),
        Some("2027-03-01T00:00:00Z")
    );
    assert_eq!(keys[1].fingerprint(), "sha256:cdcdcdcd");
    assert!(keys[2].not_after.is_some());
    // No key at all, a moment without its offset, one key twice: each named.
    let e = client("").unwrap_err().to_string();
    assert!(e.contains("key_sha256") && e.contains("keys"), "{e}");
    let e = client(&format!(
        "keys = [{{ sha256 = \"{a}\", not_after = \"2027-03-01\" }}]"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("keys[0].not_after"), "{e}");
    let e = client(&format!(
        "key_sha256 = \"{a}\"\nkeys = [{{ sha256 = \"{a}\" }}]"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("keys[0].sha256"), "{e}");
    // Two clients may not share a key, whichever way it is given.
    let e = load(&format!(
        "{GENESYS}\n[[client]]\nname = \"c\"\nkey_sha256 = \"{a}\"\n[[client]]\nname = \"d\"\nkeys = [{{ sha256 = \"{a}\" }}]\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("same key"), "{e}");
}

#[test]
fn jwt_callers_need_every_part_and_keys_over_https() {
    let client = |lines: &str| load(&format!("{GENESYS}\n[[client]]\nname = \"ci\"\n{lines}\n"));
    let whole = "jwt_issuer = \"https://token.actions.githubusercontent.com\"\njwt_audience = \"tokengate\"\njwt_subject = \"repo:org/app:*\"\n";
    let c = client(&format!(
        "{whole}jwks_url = \"https://token.actions.githubusercontent.com/.well-known/jwks\""
    ))
    .unwrap();
    let jwt = c.clients[0].jwt.as_ref().unwrap();
    assert!(c.clients[0].keys.is_empty(), "a JWT caller needs no key");
    assert!(jwt.subject_matches("repo:org/app:ref:refs/heads/main"));
    assert!(client(&format!("{whole}jwks_file = \"/etc/tokengate/jwks.json\"")).is_ok());
    assert!(client(&format!("{whole}jwks_url = \"http://127.0.0.1:8081/jwks\"")).is_ok());
    // Neither: the https issuer's discovery document says where its keys are.
    assert!(client(whole).is_ok());
    for (lines, named) in [
        (
            format!("{whole}jwks_url = \"http://idp.example.com/jwks\""),
            "https://",
        ),
        (
            whole.replace("https://token.actions.githubusercontent.com", "github"),
            "jwks_url",
        ),
        (
            format!("{whole}jwks_url = \"https://a/j\"\njwks_file = \"/j\""),
            "not both",
        ),
        (
            "jwt_issuer = \"https://a\"\njwks_file = \"/j\"".to_string(),
            "jwt_audience",
        ),
    ] {
        let e = client(&lines).unwrap_err().to_string();
        assert!(e.contains(named), "{lines}: {e}");
    }
    // A bad CA file for the keys is named by the key it was given as.
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let e = client(&format!(
        "{whole}jwks_url = \"https://a/j\"\njwks_ca_file = \"{}\"",
        not_pem.display()
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("client \"ci\".jwks_ca_file: ") && e.contains("holds no PEM certificate"),
        "{e}"
    );
}
