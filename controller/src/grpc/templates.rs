//! The Templates service: list, build and remove the warm-start templates
//! ([`crate::host::templates`]) over the runtime's [`TemplateOps`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::{self, templates_server};
use super::server::ApiState;
use crate::host::templates::{BuildRequest, TemplateError, TemplateInfo, TemplateOps};

fn status(e: &TemplateError) -> Status {
    let message = guest_api::error_chain(e);
    match e {
        TemplateError::NotFound(_) | TemplateError::Kernel(_) => Status::not_found(message),
        TemplateError::Off | TemplateError::NoInit => Status::failed_precondition(message),
        _ => Status::internal(message),
    }
}

fn template(info: &TemplateInfo) -> proto::Template {
    proto::Template {
        key: info.key.clone(),
        kernel: info.kernel.display().to_string(),
        cpus: u32::from(info.shape.vcpus),
        memory_mib: u64::from(info.shape.memory_mib),
        network: info.shape.network,
        created: info.created.clone(),
        build_ms: info.build_ms,
        memory_bytes: info.memory_bytes,
        kernel_digest: info.kernel_digest.clone(),
        init_digest: info.init_digest.clone(),
    }
}

impl ApiState {
    /// Runs a blocking template operation off the async runtime.
    async fn on_templates<T: Send + 'static>(
        &self,
        op: impl FnOnce(&dyn TemplateOps) -> Result<T, TemplateError> + Send + 'static,
    ) -> Result<T, Status> {
        let templates: Arc<dyn TemplateOps> = self
            .templates
            .clone()
            .ok_or_else(|| Status::unavailable("this API server has no runtime to build templates with"))?;
        tokio::task::spawn_blocking(move || op(templates.as_ref()))
            .await
            .map_err(|e| Status::internal(format!("template task failed: {e}")))?
            .map_err(|e| status(&e))
    }
}

#[tonic::async_trait]
impl templates_server::Templates for ApiState {
    async fn list(
        &self,
        _request: Request<proto::ListTemplatesRequest>,
    ) -> Result<Response<proto::ListTemplatesResponse>, Status> {
        let (built, building) = self.on_templates(|t| t.list_templates()).await?;
        Ok(Response::new(proto::ListTemplatesResponse { templates: built.iter().map(template).collect(), building }))
    }

    async fn build(&self, request: Request<proto::BuildTemplateRequest>) -> Result<Response<proto::Template>, Status> {
        let request = request.into_inner();
        let vcpus =
            u8::try_from(request.cpus).ok().filter(|c| (1..=vmm_core::config::MAX_VCPUS).contains(c)).ok_or_else(
                || Status::invalid_argument(format!("cpus {}: 1 to {}", request.cpus, vmm_core::config::MAX_VCPUS)),
            )?;
        let memory: crate::api::Quantity = request
            .memory
            .parse()
            .map_err(|e| Status::invalid_argument(format!("memory {:?}: {e}", request.memory)))?;
        let memory_mib = u32::try_from(memory.mib())
            .ok()
            .filter(|m| (vmm_core::config::MIN_MEMORY_MIB..=vmm_core::config::MAX_MEMORY_MIB).contains(m))
            .ok_or_else(|| Status::invalid_argument(format!("memory {}: out of range", request.memory)))?;
        let build = BuildRequest {
            vcpus,
            memory_mib,
            kernel: (!request.kernel.is_empty()).then_some(request.kernel),
            no_network: request.no_network,
        };
        let info = self.on_templates(move |t| t.build_template(&build)).await?;
        Ok(Response::new(template(&info)))
    }

    async fn delete(&self, request: Request<proto::TemplateRef>) -> Result<Response<proto::Empty>, Status> {
        let key = request.into_inner().key;
        self.on_templates(move |t| t.remove_template(&key)).await?;
        Ok(Response::new(proto::Empty {}))
    }
}
