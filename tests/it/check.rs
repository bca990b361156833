//! `tokengate check`: one test per hint code, each against local servers that answer as
//! the platforms do, and each asserting that no secret is printed.

use crate::support::pki;
use crate::support::*;
use tokengate::config::providers::GenesysRegion;
use tokengate_sandbox::Flavor;

const SECRET: &str = "the-real-secret-0451";

/// An oauth2-or-genesys upstream with everything given; its API host is the token
/// endpoint's host (the sandbox's login host answers any path) unless `extra` sets one.
fn upstream(provider: &str, token_url: &str, extra: &str) -> String {
    let region = if provider == "genesys" {
        "region = \"us_east_1\"\n"
    } else {
        ""
    };
    let base_url = if extra.contains("base_url") {
        String::new()
    } else {
        let origin = token_url.parse::<http::Uri>().unwrap();
        format!(
            "base_url = \"{}://{}\"\n",
            origin.scheme_str().unwrap(),
            origin.authority().unwrap()
        )
    };
    format!(
        "[[upstream]]\nname = \"u\"\nprovider = \"{provider}\"\n{region}token_url = \"{token_url}\"\n{base_url}client_id = \"sandbox-client\"\nclient_secret = \"${{THE_SECRET}}\"\n{extra}\n"
    )
}

/// Run `check --json` on `config`; return its one diagnosis and assert it printed nothing secret.
async fn check(config: String, secret: &str) -> serde_json::Value {
    let secret = secret.to_string();
    let (out, err, code) = tokio::task::spawn_blocking(move || {
        let (_dir, path) = write_config(&config);
        let out = binary()
            .args(["check", "--json", "-c", path.to_str().unwrap()])
            .env("THE_SECRET", &secret)
            .output()
            .unwrap();
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(
            !o.contains(&secret) && !e.contains(&secret),
            "the secret was printed"
        );
        (o, e, out.status.code())
    })
    .await
    .unwrap();
    let d: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or(""))
        .unwrap_or_else(|_| panic!("{out}{err}"));
    assert_eq!(
        code,
        Some(if d["ok"] == true { 0 } else { 1 }),
        "{out}{err}"
    );
    d
}

async fn sandbox_with(f: impl FnOnce(&mut SandboxOptions)) -> Sandbox {
    let mut o = SandboxOptions {
        client_secret: SECRET.into(),
        ..SandboxOptions::default()
    };
    f(&mut o);
    Sandbox::start(o).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn ok_when_the_grant_succeeds() {
    let s = sandbox_with(|_| {}).await;
    let d = check(upstream("genesys", &s.token_url(), ""), SECRET).await;
    assert_eq!(
        (d["ok"].as_bool(), d["hint"].as_str(), d["status"].as_u64()),
        (Some(true), Some("ok"), Some(200))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_token_path_when_the_api_gateway_answers() {
    let s = sandbox_with(|_| {}).await;
    let d = check(
        upstream(
            "genesys",
            &format!("{}/api/v2/oauth/token", s.api_url()),
            "",
        ),
        SECRET,
    )
    .await;
    assert_eq!(d["hint"], "wrong_token_path");
    assert_eq!(d["status"], 401);
    assert!(d["message"].as_str().unwrap().contains("login."), "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_client_for_a_wrong_secret() {
    let s = sandbox_with(|_| {}).await;
    // oauth2: for genesys, check would also ask the real regions' login hosts (below).
    let d = check(upstream("oauth2", &s.token_url(), ""), "not-the-secret").await;
    assert_eq!(
        (d["hint"].as_str(), d["grant_error"].as_str()),
        (Some("invalid_client"), Some("invalid_client"))
    );
    assert_eq!(d["status"], 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_client_says_when_the_other_encoding_works() {
    let secret = "p@ss+w/rd=&x";
    let s = Sandbox::start(SandboxOptions {
        client_secret: secret.into(),
        basic_form_encoded: true,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let d = check(upstream("genesys", &s.token_url(), ""), secret).await;
    assert_eq!(d["hint"], "invalid_client");
    assert!(
        d["message"]
            .as_str()
            .unwrap()
            .contains("basic_encoding = \"form\""),
        "{d}"
    );
    // And the fix it names works.
    let d = check(
        upstream("genesys", &s.token_url(), "basic_encoding = \"form\""),
        secret,
    )
    .await;
    assert_eq!(d["hint"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn grant_type_not_enabled_when_the_client_may_not_use_the_grant() {
    let s = sandbox_with(|o| o.grant_enabled = false).await;
    let d = check(upstream("genesys", &s.token_url(), ""), SECRET).await;
    assert_eq!(
        (d["hint"].as_str(), d["grant_error"].as_str()),
        (Some("grant_type_not_enabled"), Some("unauthorized_client"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_scope_when_the_scope_is_refused() {
    let s = sandbox_with(|o| o.allowed_scopes = Some(vec!["analytics".into()])).await;
    let d = check(
        upstream("oauth2", &s.token_url(), "scope = \"urn:genesyscloud:all\""),
        SECRET,
    )
    .await;
    assert_eq!(
        (d["hint"].as_str(), d["grant_error"].as_str()),
        (Some("invalid_scope"), Some("invalid_scope"))
    );
    let d = check(
        upstream("oauth2", &s.token_url(), "scope = \"analytics\""),
        SECRET,
    )
    .await;
    assert_eq!(d["hint"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_when_nothing_listens() {
    let d = check(
        upstream(
            "genesys",
            &format!("http://{}/oauth/token", closed_addr()),
            "",
        ),
        SECRET,
    )
    .await;
    assert_eq!(d["hint"], "unreachable");
    assert!(d["status"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_error_when_the_certificate_is_not_trusted() {
    let tls = serve_untrusted_tls().await;
    let d = check(
        upstream("genesys", &format!("https://{}/oauth/token", tls.addr), ""),
        SECRET,
    )
    .await;
    assert_eq!(d["hint"], "tls_error", "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_response_for_an_html_login_page() {
    let html = serve_fixed(
        200,
        "text/html",
        "<!doctype html><html><body>Sign in</body></html>",
    )
    .await;
    let d = check(
        upstream("genesys", &format!("http://{}/oauth/token", html.addr), ""),
        SECRET,
    )
    .await;
    assert_eq!(d["hint"], "bad_response");
    assert!(d["message"].as_str().unwrap().contains("HTML"), "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_region_when_another_regions_login_host_knows_the_client() {
    // The configured region's login host does not know the client; eu_west_1's does.
    let home = Sandbox::start(SandboxOptions {
        client_id: "someone-else".into(),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let eu = sandbox_with(|o| o.flavor = Flavor::Genesys).await;
    let config = upstream("genesys", &home.token_url(), "");
    let config = tokengate::config::Config::from_toml(&config, "proxy.toml".as_ref(), &|name| {
        (name == "THE_SECRET").then(|| SECRET.into())
    })
    .unwrap();
    let dead = format!("http://{}/oauth/token", closed_addr());
    let dead_url = dead.clone();
    let eu_url = eu.token_url();
    let route = move |r: &GenesysRegion| {
        if r.name == "eu_west_1" {
            eu_url.clone()
        } else {
            dead.clone()
        }
    };
    let d = tokengate::cli::check::check_with(&config, &route).await;
    let text = serde_json::to_string(&d).unwrap();
    assert!(!text.contains(SECRET));
    assert_eq!(d[0].hint, "wrong_region");
    assert!(
        d[0].message.contains("set region = \"eu_west_1\""),
        "{}",
        d[0].message
    );
    assert_eq!(eu.grant_requests(), 1, "each region asked once");
    assert_eq!(home.grant_requests(), 1);

    // When no region knows the client, it stays invalid_client.
    let nowhere = dead_url.clone();
    let d =
        tokengate::cli::check::check_with(&config, &move |_: &GenesysRegion| nowhere.clone()).await;
    assert_eq!(d[0].hint, "invalid_client");
    assert!(d[0].message.contains("Admin > OAuth"), "{}", d[0].message);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_host_is_probed_after_the_grant() {
    let s = sandbox_with(|_| {}).await;
    // The API host behind a private CA, the token endpoint on plain HTTP: the grant
    // succeeds, every call would fail.
    let pki = pki::pki();
    let front = pki::tls_front(s.api_addr, pki.server_config(false)).await;
    let private = format!("base_url = \"https://127.0.0.1:{}\"", front.addr.port());
    let d = check(upstream("genesys", &s.token_url(), &private), SECRET).await;
    assert_eq!(
        (d["ok"].as_bool(), d["hint"].as_str()),
        (Some(false), Some("api_host_tls_error")),
        "{d}"
    );
    assert!(d["message"].as_str().unwrap().contains("TLS"), "{d}");
    assert!(d["message"].as_str().unwrap().contains("ca_file"), "{d}");
    // With the CA, ok, and the budget read off the same call.
    let trusted = format!("{private}\nca_file = \"{}\"", pki.path("ca.pem"));
    let d = check(upstream("genesys", &s.token_url(), &trusted), SECRET).await;
    assert_eq!(d["hint"], "ok", "{d}");
    // Nothing listening where the API host should be.
    let nowhere = format!("base_url = \"http://{}\"", closed_addr());
    let d = check(upstream("oauth2", &s.token_url(), &nowhere), SECRET).await;
    assert_eq!(
        (d["ok"].as_bool(), d["hint"].as_str()),
        (Some(false), Some("api_host_unreachable")),
        "{d}"
    );
    // A Genesys API host that refuses the new token: another region's.
    let other = sandbox_with(|_| {}).await;
    let elsewhere = format!("base_url = \"{}\"", other.api_url());
    let d = check(upstream("genesys", &s.token_url(), &elsewhere), SECRET).await;
    assert_eq!(d["hint"], "wrong_region", "{d}");
}
