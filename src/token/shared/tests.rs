use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};

use super::*;
use crate::telemetry::metrics::Metrics;

fn cache(key_byte: u8) -> SharedCache {
    let toml = format!(
        "[[upstream]]\nname = \"a\"\nprovider = \"oauth2\"\ntoken_url = \"http://127.0.0.1:1/t\"\nbase_url = \"http://127.0.0.1:1\"\nclient_id = \"id\"\nclient_secret = \"s\"\n[cache]\nredis_url = \"redis://127.0.0.1:1\"\nencryption_key = \"{}\"\n",
        hex::encode([key_byte; 32])
    );
    let config = crate::config::Config::from_toml(&toml, "t.toml".as_ref(), &|_| None).unwrap();
    SharedCache::new(config.cache.as_ref().unwrap(), &Metrics::new()).unwrap()
}

fn token() -> SharedToken {
    SharedToken {
        access_token: SecretString::from("the-token-value"),
        issued_at: SystemTime::now(),
        lifetime: Duration::from_secs(3600),
        api_base: Some("https://api.example".into()),
        generation: 7,
    }
}

#[tokio::test]
async fn sealed_tokens_open_only_with_the_same_key_under_the_same_name() {
    let (a, other_key) = (cache(1), cache(2));
    let sealed = a.seal("k1", &token()).unwrap();
    assert!(!String::from_utf8_lossy(&sealed).contains("the-token-value"));
    let opened = a.open("k1", &sealed).unwrap();
    assert_eq!(opened.access_token.expose_secret(), "the-token-value");
    assert_eq!(opened.lifetime, Duration::from_secs(3600));
    assert_eq!(opened.api_base.as_deref(), Some("https://api.example"));
    assert_eq!(opened.generation, 7);
    assert!(a.open("k2", &sealed).is_none(), "moved to another key");
    assert!(
        other_key.open("k1", &sealed).is_none(),
        "another fleet's key"
    );
    let mut tampered = sealed.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(a.open("k1", &tampered).is_none());
    assert!(a.open("k1", b"tg1short").is_none());
    assert!(a.open("k1", b"").is_none());
}

#[tokio::test]
async fn keys_name_no_credentials() {
    let a = cache(1);
    let id = a.credentials_id("https://login.example/oauth/token|client-id|secret-hash");
    assert_eq!(id.len(), 32);
    assert!(!a.token_key(&id, 0).contains("client-id"));
    assert!(a.token_key(&id, 2).starts_with("tokengate:token:"));
    assert!(a.lock_key(&id).starts_with("tokengate:lock:"));
}
