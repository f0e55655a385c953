//! The image configuration a guest's init applies, as the image store writes it into the root filesystem.

use serde::{Deserialize, Serialize};

/// Where the image store puts the image configuration, relative to the root filesystem.
pub const IMAGE_CONFIG_PATH: &str = "etc/ignite/image.json";
/// Where the image store puts `ignite-init`, relative to the root filesystem (the kernel's `init=`).
pub const INIT_PATH: &str = "sbin/ignite-init";

/// The parts of the OCI image configuration the guest's init applies (JSON at [`IMAGE_CONFIG_PATH`]).
/// Unknown fields are ignored, so an older init still boots images from a newer store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=value`.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WorkingDir`.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `User` (`name`, `uid`, `uid:gid`).
    #[serde(default)]
    pub user: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_is_camel_case_and_a_newer_stores_fields_are_ignored() {
        let config = ImageConfig { working_dir: Some("/srv".into()), ..Default::default() };
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"workingDir\":\"/srv\""), "{json}");
        let newer: ImageConfig = serde_json::from_str(r#"{"cmd":["sh"],"stopSignal":"SIGQUIT"}"#).unwrap();
        assert_eq!(newer.cmd, ["sh"]);
    }
}
