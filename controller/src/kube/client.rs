//! Building the Kubernetes client of `ignite daemon --kube`.

use std::path::Path;

use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::{Client, Config};

use super::errors::KubeError;

/// A client from `kubeconfig` when given, else inferred as kubectl does (`$KUBECONFIG`,
/// `~/.kube/config`, then the in-cluster service account).
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config_err = |source: Box<dyn std::error::Error + Send + Sync>| KubeError::Config {
        path: kubeconfig.map(Path::to_path_buf),
        source,
    };
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|e| config_err(Box::new(e)))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| config_err(Box::new(e)))?
        }
        None => Config::infer().await.map_err(|e| config_err(Box::new(e)))?,
    };
    Client::try_from(config).map_err(|e| config_err(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_for_an_https_cluster_is_built_without_a_crypto_provider_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        let config = "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://127.0.0.1:6443\"}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n";
        std::fs::write(&path, config).unwrap();
        let client = connect(Some(&path)).await.unwrap();
        assert_eq!(client.default_namespace(), "default");
        let err = match connect(Some(&dir.path().join("missing"))).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a missing kubeconfig is an error"),
        };
        assert!(err.starts_with("cannot configure the Kubernetes client from ") && err.contains("missing"), "{err}");
    }
}
