//! `[cache]` (the fleet's Redis, by URL or sentinels) and `[telemetry]`.

use super::*;

#[test]
fn cache_takes_hex_or_base64_keys_and_names_bad_values_without_secrets() {
    let cache = |url: &str, key: &str| {
        load(&format!(
            "{GENESYS}\n[cache]\nredis_url = \"{url}\"\nencryption_key = \"{key}\"\n"
        ))
    };
    let hex_key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let b64_key = "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=";
    let a = cache("redis://:pw-123@10.0.0.5:6379/2", hex_key).unwrap();
    let b = cache("redis://:pw-123@10.0.0.5:6379/2", b64_key).unwrap();
    let (a, b) = (a.cache.unwrap(), b.cache.unwrap());
    assert!(a.same_as(&b), "the same 32 bytes either way");
    assert_eq!(a.redis_target, "10.0.0.5:6379");
    assert_eq!(a.key_prefix, "tokengate");
    let dbg = format!("{a:?}");
    assert!(
        !dbg.contains("pw-123") && !dbg.contains("0011223344"),
        "{dbg}"
    );

    let short = cache("redis://h:6379", "abcd").unwrap_err().to_string();
    assert!(
        short.contains("cache.encryption_key") && short.contains("32 bytes"),
        "{short}"
    );
    assert!(!short.contains("abcd"), "{short}");
    let bad_url = cache("http://:pw-123@h:6379", hex_key)
        .unwrap_err()
        .to_string();
    assert!(bad_url.contains("cache.redis_url"), "{bad_url}");
    assert!(!bad_url.contains("pw-123"), "{bad_url}");
    let missing = load(&format!("{GENESYS}\n[cache]\nredis_url = \"redis://h\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("cache.encryption_key") && missing.contains("required"),
        "{missing}"
    );
}

#[test]
fn cache_key_changes_with_the_secret() {
    let a = load(GENESYS).unwrap().upstreams[0].grant.cache_key();
    let b = load(&GENESYS.replace("${SECRET}", "other"))
        .unwrap()
        .upstreams[0]
        .grant
        .cache_key();
    assert_ne!(a, b);
}

#[test]
fn cache_takes_sentinels_with_a_master_name_instead_of_a_url() {
    let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let cache = |lines: &str| {
        load(&format!(
            "{GENESYS}\n[cache]\nencryption_key = \"{key}\"\n{lines}\n"
        ))
    };
    let c = cache("sentinels = [\"10.0.0.1:26379\", \"redis://:pw-sent@10.0.0.2:26379\"]\nmaster_name = \"fleet\"")
        .unwrap()
        .cache
        .unwrap();
    assert_eq!(
        c.redis_target,
        "sentinel fleet via 10.0.0.1:26379,10.0.0.2:26379"
    );
    assert!(
        matches!(&c.redis, RedisTarget::Sentinel { sentinels, master_name } if sentinels.len() == 2 && master_name == "fleet")
    );
    assert!(!format!("{c:?}").contains("pw-sent"));
    for (lines, expected) in [
        (
            "sentinels = [\"h:26379\"]",
            "cache.master_name: is required",
        ),
        ("sentinels = []\nmaster_name = \"m\"", "lists no sentinel"),
        (
            "sentinels = [\"h:26379\"]\nmaster_name = \"m\"\nredis_url = \"redis://h\"",
            "not both",
        ),
        (
            "redis_url = \"redis://h\"\nmaster_name = \"m\"",
            "is used with sentinels only",
        ),
        (
            "sentinels = [\"ftp://:pw-x@h\"]\nmaster_name = \"m\"",
            "cache.sentinels[0]",
        ),
    ] {
        let e = cache(lines).unwrap_err().to_string();
        assert!(
            e.contains(expected) && !e.contains("pw-x"),
            "{expected:?} not in {e}"
        );
    }
}

#[test]
fn telemetry_is_off_by_default_and_its_keys_are_checked() {
    assert!(load(GENESYS).unwrap().telemetry.is_none());
    let on = load(&format!(
        "{GENESYS}\n[telemetry]\notlp_endpoint = \"http://collector:4318\"\nheaders = {{ authorization = \"${{SECRET}}\" }}\n"
    ))
    .unwrap();
    let t = on.telemetry.unwrap();
    assert_eq!(t.endpoint.to_string(), "http://collector:4318/v1/traces");
    assert_eq!(
        (t.service_name.as_str(), t.sample_ratio),
        ("tokengate", 1.0)
    );
    assert!(!format!("{t:?}").contains("super-secret-value"));
    let as_given = load(&format!(
        "{GENESYS}\n[telemetry]\notlp_endpoint = \"https://c.example/otlp/v1/traces\"\n"
    ))
    .unwrap();
    assert_eq!(
        as_given.telemetry.unwrap().endpoint.to_string(),
        "https://c.example/otlp/v1/traces"
    );
    for (extra, says) in [
        ("sample_ratio = 0.5", "otlp_endpoint: is required"),
        (
            "otlp_endpoint = \"http://c:4318\"\nsample_ratio = 2.0",
            "sample_ratio",
        ),
        ("otlp_endpoint = \"ftp://c\"", "otlp_endpoint"),
        (
            "otlp_endpoint = \"http://c:4318\"\nsampling = 1",
            "unknown field",
        ),
    ] {
        let e = load(&format!("{GENESYS}\n[telemetry]\n{extra}\n")).unwrap_err();
        assert!(e.to_string().contains(says), "{extra}: {e}");
    }
}
