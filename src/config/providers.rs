//! What each platform looks like from outside: where its tokens and its API live.
//!
//! Sources: the Genesys Cloud region table is the official SDKs' (`PureCloudRegionHosts`),
//! and the SDKs derive the login host from the API host by replacing `api.` with `login.`;
//! CXone's discovery and grant follow NICE's developer portal and a public client of it
//! (Cognigy's CXone extension, `cxone-api-client.ts`).

/// The kind of platform an upstream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Genesys Cloud: `client_credentials` at `login.<domain>`, API at `api.<domain>`.
    Genesys,
    /// NICE CXone back-end apps (discovery, password grant with an access key).
    Cxone,
    /// Any OAuth 2.0 `client_credentials` server (RFC 6749 §4.4).
    Oauth2,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Genesys => "genesys",
            Provider::Cxone => "cxone",
            Provider::Oauth2 => "oauth2",
        }
    }
}

/// NICE CXone's issuer, where discovery starts (FedRAMP: `https://cxone-gov.niceincontact.com`).
pub const CXONE_ISSUER: &str = "https://cxone.niceincontact.com";

/// A Genesys Cloud region: the SDKs' name and its domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenesysRegion {
    pub name: &'static str,
    pub domain: &'static str,
}

impl GenesysRegion {
    pub fn token_url(&self) -> String {
        format!("https://login.{}/oauth/token", self.domain)
    }

    pub fn api_url(&self) -> String {
        format!("https://api.{}", self.domain)
    }

    /// The notification service's WebSocket host (`wss://streaming.<domain>`), as the
    /// `https` URL the proxy connects to.
    pub fn streaming_url(&self) -> String {
        format!("https://streaming.{}", self.domain)
    }
}

/// Every region of the official SDKs (JS `PureCloudRegionHosts.js`, .NET `PureCloudRegionHosts.cs`).
pub const GENESYS_REGIONS: [GenesysRegion; 18] = [
    GenesysRegion {
        name: "us_east_1",
        domain: "mypurecloud.com",
    },
    GenesysRegion {
        name: "eu_west_1",
        domain: "mypurecloud.ie",
    },
    GenesysRegion {
        name: "ap_southeast_2",
        domain: "mypurecloud.com.au",
    },
    GenesysRegion {
        name: "ap_northeast_1",
        domain: "mypurecloud.jp",
    },
    GenesysRegion {
        name: "eu_central_1",
        domain: "mypurecloud.de",
    },
    GenesysRegion {
        name: "us_west_2",
        domain: "usw2.pure.cloud",
    },
    GenesysRegion {
        name: "ca_central_1",
        domain: "cac1.pure.cloud",
    },
    GenesysRegion {
        name: "ap_northeast_2",
        domain: "apne2.pure.cloud",
    },
    GenesysRegion {
        name: "eu_west_2",
        domain: "euw2.pure.cloud",
    },
    GenesysRegion {
        name: "ap_south_1",
        domain: "aps1.pure.cloud",
    },
    GenesysRegion {
        name: "us_east_2",
        domain: "use2.us-gov-pure.cloud",
    },
    GenesysRegion {
        name: "sa_east_1",
        domain: "sae1.pure.cloud",
    },
    GenesysRegion {
        name: "me_central_1",
        domain: "mec1.pure.cloud",
    },
    GenesysRegion {
        name: "ap_northeast_3",
        domain: "apne3.pure.cloud",
    },
    GenesysRegion {
        name: "eu_central_2",
        domain: "euc2.pure.cloud",
    },
    GenesysRegion {
        name: "mx_central_1",
        domain: "mxc1.pure.cloud",
    },
    GenesysRegion {
        name: "ap_southeast_1",
        domain: "apse1.pure.cloud",
    },
    GenesysRegion {
        name: "eusc_de_east_1",
        domain: "edee1.eusc-pure.cloud",
    },
];

/// Look a region up by its SDK name; Terraform's hyphenated spelling (`us-east-1`) works
/// too, and so does its domain as the admin UI or a URL shows it (`mypurecloud.de`,
/// `api.mypurecloud.de`, `https://login.mypurecloud.de/`).
pub fn genesys_region(name: &str) -> Option<GenesysRegion> {
    let wanted = name.trim().to_ascii_lowercase();
    let host = wanted
        .split_once("://")
        .map_or(wanted.as_str(), |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or("");
    let domain = ["api.", "login.", "apps.", "streaming."]
        .iter()
        .find_map(|label| host.strip_prefix(label))
        .unwrap_or(host);
    let by_name = wanted.replace('-', "_");
    GENESYS_REGIONS
        .iter()
        .copied()
        .find(|r| r.name == by_name || r.domain == domain)
}

/// The region name nearest to a misspelt one, if one is near.
pub fn nearest_genesys_region(name: &str) -> Option<&'static str> {
    let wanted = name.trim().to_ascii_lowercase().replace('-', "_");
    GENESYS_REGIONS
        .iter()
        .map(|r| (strsim::levenshtein(&wanted, r.name), r.name))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, n)| n)
}

pub fn genesys_region_names() -> Vec<&'static str> {
    GENESYS_REGIONS.iter().map(|r| r.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_region_has_login_and_api_hosts() {
        for r in GENESYS_REGIONS {
            assert_eq!(
                r.token_url()
                    .replace("//login.", "//api.")
                    .replace("/oauth/token", ""),
                r.api_url()
            );
        }
    }

    #[test]
    fn both_spellings_are_accepted() {
        assert_eq!(
            genesys_region("us-east-1").unwrap().domain,
            "mypurecloud.com"
        );
        assert_eq!(
            genesys_region("eusc_de_east_1").unwrap().domain,
            "edee1.eusc-pure.cloud"
        );
        assert!(genesys_region("us_east_9").is_none());
    }

    #[test]
    fn a_domain_names_its_region_and_a_typo_is_given_the_nearest() {
        for given in [
            "mypurecloud.de",
            "api.mypurecloud.de",
            "https://login.mypurecloud.de/",
        ] {
            assert_eq!(
                genesys_region(given).map(|r| r.name),
                Some("eu_central_1"),
                "{given}"
            );
        }
        assert_eq!(
            genesys_region("usw2.pure.cloud").map(|r| r.name),
            Some("us_west_2")
        );
        assert!(genesys_region("example.com").is_none());
        assert_eq!(nearest_genesys_region("us_east_9"), Some("us_east_1"));
        assert_eq!(nearest_genesys_region("eu-wset-1"), Some("eu_west_1"));
        assert_eq!(nearest_genesys_region("mars"), None);
    }
}
