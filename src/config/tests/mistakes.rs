//! Mistakes an operator makes in proxy.toml: each error names the key, says what was
//! expected, and never quotes a secret.

use super::*;
use secrecy::ExposeSecret;

#[test]
fn unknown_key_is_an_error_naming_it() {
    let err = load(&format!("{GENESYS}\nclient_secrte = \"x\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("proxy.toml: "), "{err}");
    assert!(err.contains("client_secrte"), "{err}");
    assert!(err.contains("line"), "{err}");
}

#[test]
fn missing_variable_is_named_and_no_secret_is_printed() {
    let text = GENESYS.replace("${ID}", "${NOPE}");
    let err = load(&text).unwrap_err().to_string();
    assert!(
        err.contains("environment variable NOPE is not set"),
        "{err}"
    );
    assert!(err.contains("upstream \"genesys\".client_id"), "{err}");
    let dbg = format!("{:?}", load(GENESYS).unwrap());
    assert!(!dbg.contains("super-secret-value"), "{dbg}");
}

#[test]
fn every_missing_variable_is_named_in_one_error() {
    let text = format!(
        "[server]\npublic_url = \"${{PUBLIC}}\"\n{}\n[cache]\nredis_url = \"${{R_URL}}\"\nencryption_key = \"${{R_KEY}}\"\n",
        GENESYS
            .replace("${ID}", "${A_ID}")
            .replace("client_id", "scope = \"${A_SCOPE} x $$ ${A_SCOPE}\"\ntoken_params = { audience = \"${A_AUD}\" }\nclient_id")
    );
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("6 environment variables are not set"), "{err}");
    for (name, key) in [
        ("A_ID", "upstream \"genesys\".client_id"),
        ("A_SCOPE", "upstream \"genesys\".scope"),
        ("A_AUD", "upstream \"genesys\".token_params.audience"),
        ("R_URL", "cache.redis_url"),
        ("R_KEY", "cache.encryption_key"),
        ("PUBLIC", "server.public_url"),
    ] {
        assert!(err.contains(&format!("{name} ({key})")), "{name}: {err}");
    }
}

#[test]
fn allow_rules_that_could_never_match_are_refused_naming_the_rule() {
    for (rule, says) in [
        ("get /api/v2/users/**", "upper-case"),
        ("GETT /api/v2/users", "not a method"),
        ("GET /api/v2/routing/queues/{queueId}", "written *"),
        ("GET /api/v2/groups/**?x=1", "leave out the query"),
    ] {
        let text = format!(
            "{GENESYS}\n[[client]]\nname = \"c\"\nkey_sha256 = \"{}\"\nallow = [\"GET /ok\", \"{rule}\"]\n",
            "ab".repeat(32)
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("client \"c\".allow[1]"), "{err}");
        assert!(err.contains(rule) && err.contains(says), "{err}");
    }
}

#[test]
fn a_misspelt_key_or_region_gets_the_nearest_name() {
    let err = load(&GENESYS.replace("region", "regoin"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("did you mean `region`?"), "{err}");
    let err = load(&GENESYS.replace("eu_west_1", "eu_wset_1"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("did you mean \"eu_west_1\"?"), "{err}");
    let c = load(&GENESYS.replace("eu_west_1", "mypurecloud.ie")).unwrap();
    assert_eq!(c.upstreams[0].region.map(|r| r.name), Some("eu_west_1"));
}

#[test]
fn an_unquoted_text_value_is_told_to_go_in_quotes() {
    let err = load(&format!("[server]\nlisten = 127.0.0.1:8088\n{GENESYS}"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 2") && err.contains("listen = \"…\""),
        "{err}"
    );
    // A secret typed without quotes is not printed.
    let err = load(&GENESYS.replace("\"${SECRET}\"", "s3cr3t-Value!"))
        .unwrap_err()
        .to_string();
    assert!(!err.contains("s3cr3t"), "{err}");
}

#[test]
fn unknown_region_lists_the_valid_ones() {
    let err = load(&GENESYS.replace("eu_west_1", "us-east-9"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("us-east-9") && err.contains("mx_central_1"),
        "{err}"
    );
}

#[test]
fn toml_errors_name_the_place_and_never_quote_a_secret() {
    let secret = "Zq8!x-very-secret";
    for (text, key) in [
        (format!("[[upstream]]\nname = \"a\"\nclient_secret = \"{secret}\nprovider = \"genesys\"\n"), None),
        (format!("[[upstream]]\nname = \"a\"\ntokens = \"{secret}\"\n"), Some("tokens")),
        (format!("[[upstream]]\nname = \"a\"\nmax_connections = 987654321987654321987\nclient_secret = \"{secret}\"\n"), None),
        (format!("[[upstream]]\nname = \"a\"\nclient_secret = \"{secret}\" x\n"), None),
    ] {
        let err = Config::from_toml(&text, "p.toml".as_ref(), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(!err.contains(secret) && !err.contains("Zq8"), "{err}");
        assert!(err.starts_with("p.toml: line "), "{err}");
        if let Some(key) = key {
            assert!(err.contains(&format!("key `{key}`")), "{err}");
        }
    }
}

#[test]
fn interpolation_handles_dollars() {
    let text = GENESYS.replace("${SECRET}", "a$$b$c${SECRET}");
    let c = load(&text).unwrap();
    assert_eq!(
        c.upstreams[0]
            .grant
            .client_secret
            .as_ref()
            .unwrap()
            .value
            .expose_secret(),
        "a$b$csuper-secret-value"
    );
}

#[test]
fn closed_sets_of_words_name_the_key_and_the_accepted_values() {
    let with = |line: &str| {
        GENESYS.replace(
            "client_id = \"${ID}\"",
            &format!("client_id = \"${{ID}}\"\n{line}"),
        )
    };
    for (line, key, accepted) in [
        ("auth_method = \"bearer\"", "auth_method", "`basic`"),
        ("basic_encoding = \"url\"", "basic_encoding", "`form`"),
    ] {
        let e = load(&with(line)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("key `{key}`")) && e.contains(accepted),
            "{e}"
        );
    }
    let e = load(&GENESYS.replace("provider = \"genesys\"", "provider = \"genesis\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("key `provider`") && e.contains("`cxone`"), "{e}");
    let e = load(&format!("[log]\nformat = \"xml\"\n{GENESYS}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("key `format`") && e.contains("`json`"), "{e}");
    // The aliases the OAuth specs use are accepted.
    let c = load(&with(
        "auth_method = \"client_secret_post\"\nbasic_encoding = \"form\"",
    ))
    .unwrap();
    assert_eq!(c.upstreams[0].grant.auth_method, AuthMethod::Post);
    assert_eq!(
        c.upstreams[0].grant.basic_encoding,
        BasicEncoding::FormEncoded
    );
}
