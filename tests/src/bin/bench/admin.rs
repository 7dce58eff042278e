//! Bulk set-up over the admin socket (200 CLI processes would only slow the benchmark down).

use anyhow::Result;
use lanyard_proto::admin::admin_service_client::AdminServiceClient;
use lanyard_proto::admin::{CreateEntryRequest, CreateJoinTokenRequest};
use lanyard_proto::types;
use lanyard_tests::TrustDomain;
use tonic::transport::Channel;

pub(crate) async fn admin(td: &TrustDomain) -> Result<AdminServiceClient<Channel>> {
    Ok(AdminServiceClient::new(
        lanyard_daemon::uds::channel(td.server.admin_socket.clone()).await?,
    ))
}

pub(crate) fn uid_selector(uid: u32) -> types::Selector {
    types::Selector {
        r#type: "unix".into(),
        value: format!("uid:{uid}"),
    }
}

pub(crate) async fn create_entry(
    admin: &mut AdminServiceClient<Channel>,
    spiffe_id: &str,
    parent_id: &str,
    selector: types::Selector,
) -> Result<String> {
    let entry = types::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent_id.into(),
        selectors: vec![selector],
        ..Default::default()
    };
    Ok(admin
        .create_entry(CreateEntryRequest { entry: Some(entry) })
        .await?
        .into_inner()
        .id)
}

pub(crate) async fn join_token(
    admin: &mut AdminServiceClient<Channel>,
    alias: &str,
) -> Result<String> {
    let req = CreateJoinTokenRequest {
        ttl: 600,
        spiffe_id: alias.into(),
    };
    Ok(admin.create_join_token(req).await?.into_inner().token)
}
