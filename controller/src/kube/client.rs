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
