//! The config's tests, by theme. The fixtures they share are here: an environment with
//! `ID` and `SECRET` set, and two upstreams to build on.

use super::*;

mod cache_and_telemetry;
mod clients;
mod mistakes;
mod upstreams;

fn env(name: &str) -> Option<String> {
    match name {
        "ID" => Some("my-id".into()),
        "SECRET" => Some("super-secret-value".into()),
        _ => None,
    }
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("proxy.toml"), &env)
}

const GENESYS: &str = r#"
[[upstream]]
name = "genesys"
provider = "genesys"
region = "eu_west_1"
client_id = "${ID}"
client_secret = "${SECRET}"
"#;

const OAUTH2: &str = r#"
[[upstream]]
name = "idp"
provider = "oauth2"
token_url = "https://idp.example.com/token"
base_url = "https://api.example.com"
client_id = "${ID}"
"#;
