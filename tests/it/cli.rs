//! The command line: config errors, `check`, `key`, and that nothing secret is ever printed.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use crate::support::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = binary();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_errors_exit_2_and_name_the_file_and_key() {
    let cases = [
        (
            "[[upstream]]\nname = \"g\"\nprovider = \"genesys\"\nregion = \"us_east_1\"\nclient_id = \"${NO_SUCH_VAR_TG}\"\nclient_secret = \"x\"\n",
            "environment variable NO_SUCH_VAR_TG is not set",
        ),
        (
            "[[upstream]]\nname = \"g\"\nprovider = \"genesys\"\nregion = \"us_east_1\"\nclient_id = \"a\"\nclient_secret = \"x\"\nclient_secrte = \"y\"\n",
            "client_secrte",
        ),
        (
            "[[upstream]]\nname = \"g\"\nprovider = \"genesys\"\nregion = \"moon_1\"\nclient_id = \"a\"\nclient_secret = \"x\"\n",
            "unknown Genesys Cloud region \"moon_1\"",
        ),
        (
            "[server]\nlisten = \"0.0.0.0:0\"\n[[upstream]]\nname = \"g\"\nprovider = \"genesys\"\nregion = \"us_east_1\"\nclient_id = \"a\"\nclient_secret = \"x\"\n",
            "allow_anonymous",
        ),
    ];
    let good = "[[upstream]]\nname = \"g\"\nprovider = \"genesys\"\nregion = \"us_east_1\"\nclient_id = \"a\"\nclient_secret = \"x\"\n";
    let rules: Vec<(String, &str)> = [
        "get /api/v2/users/**",
        "GETT /api/v2/users",
        "GET /api/v2/routing/queues/{queueId}",
        "GET /api/v2/groups/**?x=1",
    ]
    .iter()
    .map(|rule| {
        (
            format!(
                "{good}[[client]]\nname = \"c\"\nkey_sha256 = \"{}\"\nallow = [\"{rule}\"]\n",
                "ab".repeat(32)
            ),
            *rule,
        )
    })
    .collect();
    let cases = cases.iter().map(|(t, e)| (t.to_string(), *e)).chain(rules);
    for (text, expected) in cases {
        let text = text.as_str();
        let (_dir, path) = write_config(text);
        let (code, _out, err) = run(&["run", "-c", path.to_str().unwrap()], &[]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(expected), "{err}");
        assert!(err.contains("proxy.toml"), "{err}");
    }
    let (code, _, err) = run(&["-c", "/nonexistent/proxy.toml"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/proxy.toml"), "{err}");
}

#[test]
fn the_example_proxy_toml_is_valid() {
    let text = include_str!("../../proxy.toml");
    let env = |name: &str| Some(format!("value-of-{name}"));
    let config = tokengate::config::Config::from_toml(text, "proxy.toml".as_ref(), &env).unwrap();
    assert_eq!(
        config.upstreams[0].grant.token_url.as_deref(),
        Some("https://login.mypurecloud.com/oauth/token")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_each_upstream_and_prints_no_secret() {
    let sandbox = sandbox().await;
    let config = format!(
        "{}{}",
        upstream_toml(&sandbox, "good", "/"),
        upstream_toml(&sandbox, "bad", "/bad")
            .replace("${SANDBOX_SECRET}", "${BAD_SECRET}")
            // oauth2: a Genesys invalid_client would also ask the real regions' login hosts.
            .replace(
                "provider = \"genesys\"\nregion = \"us_east_1\"",
                "provider = \"oauth2\""
            )
    );
    let (_dir, path) = write_config(&config);
    let path = path.to_str().unwrap().to_string();
    let env = [
        ("SANDBOX_SECRET", CLIENT_SECRET),
        ("BAD_SECRET", "wrong-secret-987"),
    ];
    let (code, out, err) =
        tokio::task::spawn_blocking(move || run(&["check", "--json", "-c", &path], &env))
            .await
            .unwrap();
    assert_eq!(code, Some(1), "{out}{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["upstream"], "good");
    assert_eq!(lines[0]["ok"], true);
    assert_eq!(lines[0]["hint"], "ok");
    assert_eq!(lines[1]["upstream"], "bad");
    assert_eq!(lines[1]["ok"], false);
    assert_eq!(lines[1]["hint"], "invalid_client");
    assert_eq!(lines[1]["grant_error"], "invalid_client");
    assert_eq!(lines[1]["status"], 400);
    assert_eq!(lines[1]["token_url"], sandbox.token_url());
    for secret in [CLIENT_SECRET, "wrong-secret-987"] {
        assert!(!out.contains(secret) && !err.contains(secret));
    }
    for token in sandbox.issued_tokens() {
        assert!(!out.contains(&token) && !err.contains(&token));
    }
    assert_eq!(sandbox.grant_requests(), 2, "one grant per upstream");
}

#[test]
fn key_new_and_hash_agree() {
    let (code, out, _) = run(&["key", "new"], &[]);
    assert_eq!(code, Some(0));
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim()
        .to_string();
    let hash = out
        .lines()
        .find_map(|l| l.strip_prefix("key_sha256:"))
        .unwrap()
        .trim()
        .to_string();
    let mut child = binary()
        .args(["key", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{key}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), hash);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_with_known_secrets_logs_none_of_them() {
    let sandbox = sandbox().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}{}{}",
        upstream_toml(&sandbox, "genesys", "/"),
        upstream_toml(&sandbox, "broken", "/broken").replace("${SANDBOX_SECRET}", "${BAD_SECRET}"),
        client_toml("job", "")
    );
    let proxy = Proxy::start_with_env(
        &config,
        &[
            ("SANDBOX_SECRET", CLIENT_SECRET),
            ("BAD_SECRET", "bad-secret-4242"),
        ],
    );
    let c = client();
    let auth = format!("Bearer {CLIENT_KEY}");
    let mut bodies = String::new();
    // A revoked token first: the retry mints a fresh one (the platform, asked, says the
    // token is good when always401 below refuses it, so that mints nothing).
    assert_eq!(
        c.get(proxy.url("/api/v2/users/me"))
            .header("Authorization", &auth)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sandbox.revoke_all();
    let r = c
        .post(proxy.url("/api/v2/y"))
        .header("Authorization", &auth)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for path in [
        "/api/v2/users/me",
        "/api/v2/x?access_token=query-secret-1",
        "/broken/api/v2/x",
        "/api/v2/sandbox/always401",
    ] {
        let r = c
            .get(proxy.url(path))
            .header("Authorization", &auth)
            .send()
            .await
            .unwrap();
        bodies.push_str(&r.text().await.unwrap());
    }
    let r = c
        .get(proxy.url("/api/v2/y"))
        .header("Authorization", "Bearer wrong-key-77")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for admin in ["/metrics", "/readyz"] {
        bodies.push_str(
            &c.get(proxy.admin_url(admin))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    // Scan everything, up to the audit line of the last call (the 401).
    let output = proxy.output.clone();
    let logs = wait_for(Duration::from_secs(10), || {
        let text = output.text();
        text.contains("status=401").then_some(text)
    })
    .await
    .expect("the last call's audit line");
    assert!(
        logs.contains("token granted"),
        "debug logs were captured:\n{logs}"
    );
    assert!(logs.contains("token grant failed"), "{logs}");
    let mut secrets = vec![
        CLIENT_SECRET.to_string(),
        "bad-secret-4242".into(),
        CLIENT_KEY.into(),
        "wrong-key-77".into(),
        "query-secret-1".into(),
    ];
    secrets.extend(sandbox.issued_tokens());
    assert!(sandbox.issued_tokens().len() == 1);
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a secret is in the logs");
        // (The sandbox echoes the query it got, so the query secret is in its answer.)
        if !s.starts_with("query-secret") {
            assert!(!bodies.contains(s.as_str()), "a secret is in an answer");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_proxy_on_a_port_in_use_exits_1_instead_of_sharing_it() {
    let sandbox = sandbox().await;
    let first = Proxy::start(&standard_config(&sandbox, ""));
    let taken = standard_config(&sandbox, "").replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", first.addr),
        1,
    );
    let (_dir, path) = write_config(&taken);
    let out = binary()
        .args(["run", "-c"])
        .arg(&path)
        .env("SANDBOX_SECRET", CLIENT_SECRET)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot listen on") && err.contains(&first.addr),
        "{err}"
    );
    // The first one still serves.
    assert_eq!(get_with_key(&first, "/api/v2/users/me").await.status(), 200);
}

#[test]
fn every_command_says_its_exit_codes_and_offers_only_the_options_it_takes() {
    for (command, codes) in [
        (&["run"][..], "2 on a config error"),
        (&["check"][..], "1 when one fails"),
        (&["demo"][..], "0 after Ctrl-C"),
        (&["key"][..], "Exit status: 0"),
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let (code, out, _) = run(&args, &[]);
        assert_eq!(code, Some(0));
        assert!(out.contains("Exit status:") && out.contains(codes), "{out}");
        let takes_config = matches!(command[0], "run" | "check");
        assert_eq!(out.contains("--config"), takes_config, "{command:?}: {out}");
    }
}

#[test]
fn the_demo_prints_the_status_pages_address() {
    let mut child = binary()
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains("Ctrl-C stops the demo") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() == 0 {
            break;
        }
        printed.push_str(&line);
    }
    let _ = child.kill();
    let _ = child.wait();
    let page = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("status page "))
        .unwrap_or_else(|| panic!("{printed}"));
    assert!(page.starts_with("http://127.0.0.1:"), "{page}");
}
