//! The files in `deploy/` work as written (issue 29): the systemd unit's install lines,
//! run into a temporary root, leave everything `ExecStart` needs readable by the service's
//! dynamic user (and the secrets readable by root only), and `systemd-analyze security`
//! rates the unit's exposure 2.0 or less.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = include_str!("../../deploy/tokengate.service");

/// The unit's `#   install …` lines, with every path moved under `root`.
fn install_lines(root: &Path) -> Vec<String> {
    let repo = env!("CARGO_MANIFEST_DIR");
    UNIT.lines()
        .filter_map(|l| l.strip_prefix("#   install "))
        .map(|l| {
            format!("install {l}")
                .replace("target/release/tokengate", env!("CARGO_BIN_EXE_tokengate"))
                .replace(" proxy.toml ", &format!(" {repo}/proxy.toml "))
                .replace(" /usr/", &format!(" {}/usr/", root.display()))
                .replace(" /etc/", &format!(" {}/etc/", root.display()))
        })
        .collect()
}

/// Whether someone who is neither owner nor group can read (and, for directories and
/// programs, enter or run) `path`, and every directory above it up to `root`.
fn others_can(path: &Path, root: &Path, bits: u32) -> bool {
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0)
    };
    if mode(path) & bits != bits {
        return false;
    }
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) {
            break;
        }
        if mode(d) & 0o001 == 0 {
            return false;
        }
        dir = d.parent();
    }
    true
}

#[test]
fn the_units_install_lines_leave_the_config_readable_by_the_service_and_the_secrets_not() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("usr/local/bin")).unwrap();
    let lines = install_lines(root.path());
    assert!(lines.len() >= 3, "{lines:?}");
    for line in &lines {
        let status = Command::new("sh").args(["-c", line]).status().unwrap();
        assert!(status.success(), "{line}");
    }
    let exec_start = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let mut words = exec_start.split_whitespace();
    let program = root
        .path()
        .join(words.next().unwrap().trim_start_matches('/'));
    let config = words
        .skip_while(|w| *w != "-c")
        .nth(1)
        .map(|c| root.path().join(c.trim_start_matches('/')))
        .unwrap();
    assert!(
        others_can(&program, root.path(), 0o005),
        "{}",
        program.display()
    );
    assert!(
        others_can(&config, root.path(), 0o004),
        "{}",
        config.display()
    );
    let secrets: PathBuf = root.path().join("etc/tokengate/secrets.env");
    let mode = std::fs::metadata(&secrets).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "secrets.env is the owner's only: {mode:o}");
    // The installed config is the example, and it loads as the service would read it.
    let out = Command::new(&program)
        .args(["check", "-c", config.to_str().unwrap()])
        .env("GENESYS_CLIENT_ID", "id")
        .env("GENESYS_CLIENT_SECRET", "secret")
        .output()
        .unwrap();
    assert_ne!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs systemd-analyze: scripts/test.sh installs it and runs these"]
fn systemd_rates_the_units_exposure_two_or_less() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tokengate.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for tokengate.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text}{}", String::from_utf8_lossy(&out.stderr)));
    assert!(level <= 2.0, "exposure {level}: {text}");
}

#[test]
fn the_kubernetes_configmap_loads_with_the_secrets_variables() {
    let manifest = include_str!("../../deploy/kubernetes.yaml");
    // The ConfigMap's proxy.toml: the block under `proxy.toml: |`, four spaces in.
    let config: String = manifest
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("proxy.toml: |"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(config.contains("[[upstream]]"), "{config}");
    assert!(
        !config.contains('<'),
        "no placeholder is left to fill in: {config}"
    );
    let (_dir, path) = crate::support::write_config(&config);
    check_is_not_a_config_error(
        &path,
        &[
            ("REPORTING_JOB_KEY_SHA256", KEY_HASH),
            (
                "TOKENGATE_CACHE_KEY",
                "q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c=",
            ),
            ("REDIS_PASSWORD", "pw"),
        ],
    );
}

/// A key's SHA-256, for the variables that hold one.
const KEY_HASH: &str = "5f2d3b0c3d1e7c9a2b4f6e8d0c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5c7b";

/// `check -c path` with the Genesys and admin variables and `more` set: the grant cannot
/// reach Genesys from here, so 1 — never a config error (2).
fn check_is_not_a_config_error(path: &Path, more: &[(&str, &str)]) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["check", "--json", "-c", path.to_str().unwrap()])
        .env("GENESYS_CLIENT_ID", "id")
        .env("GENESYS_CLIENT_SECRET", "secret")
        .env("ADMIN_KEY_SHA256", KEY_HASH)
        .envs(more.iter().copied())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_container_config_listens_on_all_addresses_and_loads_with_its_variables() {
    let config = include_str!("../../deploy/container.toml");
    assert!(config.contains("listen = \"0.0.0.0:8080\""));
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/container.toml");
    check_is_not_a_config_error(&path, &[("CLIENT_KEY_SHA256", KEY_HASH)]);
}
