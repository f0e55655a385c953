//! The standard gRPC services every tool expects next to ignite's own: health checking
//! (`grpc.health.v1`) and server reflection (`grpc.reflection.v1` and `v1alpha`), so `grpcurl`-style
//! tools, load balancers and probes work without the `.proto` file.

use std::time::Duration;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use super::proto;

/// The fully qualified names of ignite's own services, as health and reflection report them.
pub const SERVICES: &[&str] = &[
    "ignite.v1alpha1.Vms",
    "ignite.v1alpha1.Events",
    "ignite.v1alpha1.Sources",
    "ignite.v1alpha1.Images",
    "ignite.v1alpha1.Kernels",
    "ignite.v1alpha1.Host",
];

/// How often the daemon looks again at what its health depends on.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// The daemon's health as the health service reports it, for the whole server (`""`) and for each of
/// [`SERVICES`]. Starts NOT_SERVING.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// A health service whose every entry is NOT_SERVING until [`Health::set`] says otherwise.
    pub async fn new() -> Health {
        let health = Health { reporter: HealthReporter::new() };
        health.set(false).await;
        health
    }

    /// Reports every entry as SERVING (`true`) or NOT_SERVING.
    pub async fn set(&self, serving: bool) {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        for name in std::iter::once("").chain(SERVICES.iter().copied()) {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Whether the whole server (`""`) is reported SERVING now.
    pub async fn serving(&self) -> bool {
        use tonic_health::pb::health_server::Health as _;
        let service = HealthService::from_health_reporter(self.reporter.clone());
        let request = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: String::new() });
        service.check(request).await.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
    }

    /// The service to add to a server: it answers with what [`Health::set`] last reported.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }
}

/// The reflection services (v1, and v1alpha for older tools), over ignite's descriptor set.
pub fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // The descriptor sets are generated at build time from the checked-in protos: a failure here is a
    // build defect, caught by every test that starts a server.
    let v1 = builder().build_v1().expect("ignite's generated descriptor set is valid");
    let v1alpha = builder().build_v1alpha().expect("ignite's generated descriptor set is valid");
    (v1, v1alpha)
}

/// What the daemon's health service says for the whole server: `SERVING`, `NOT_SERVING`, ...
pub async fn check_health(channel: tonic::transport::Channel) -> Result<String, tonic::Status> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let reply = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
    let status = tonic_health::pb::health_check_response::ServingStatus::try_from(reply.into_inner().status)
        .map_or_else(|_| "UNKNOWN".to_string(), |s| s.as_str_name().to_string());
    Ok(status)
}

/// The services the daemon's reflection service lists, sorted.
pub async fn list_services(channel: tonic::transport::Channel) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies =
        ServerReflectionClient::new(channel).server_reflection_info(tokio_stream::once(request)).await?.into_inner();
    let mut names = Vec::new();
    while let Some(reply) = replies.message().await? {
        match reply.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => names.extend(list.service.into_iter().map(|s| s.name)),
            Some(MessageResponse::ErrorResponse(e)) => return Err(tonic::Status::unknown(e.error_message)),
            _ => {}
        }
    }
    names.sort();
    Ok(names)
}
