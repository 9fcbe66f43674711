//! The broker against the Resource Manager and Entra fixture (HTTPS, test CA), with the same
//! cloud-init harness as on AWS: a VM created for a job boots into a real agent named after the VM
//! (Azure's metadata service), runs the job, and is deleted once idle.

use std::sync::Arc;
use std::time::Duration;

use crate::arm_fixture::{ArmFixture, CLIENT_ID, SECRET, TENANT};
use crate::cloud_init::CloudInit;
use crate::common::{Cluster, Setup, enrolling, eventually, submit, wait_job};

const TTL: Duration = Duration::from_secs(3);
const SIZE: &str = "Standard_ND96isr_H100_v5";

/// Boots every VM the fixture holds; VMs it no longer holds take their agents with them.
async fn watch(arm: Arc<ArmFixture>, cloud: Arc<CloudInit>) {
    loop {
        let names = arm.vm_names();
        for name in &names {
            if let Some(user_data) = arm.custom_data(name) {
                cloud.boot(name, SIZE, &user_data).await;
            }
        }
        cloud.keep_only(&names.iter().map(String::as_str).collect::<Vec<_>>());
        cloud.revive();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_azure_vm_is_created_for_a_job_enrols_under_its_name_and_is_deleted_when_idle() {
    let arm = Arc::new(ArmFixture::start().await);
    let launch = arm.launch_settings();
    let snapshot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json");
    let arm_for_setup = launch.clone();
    let cluster = Cluster::start_with(TTL, &[], move |dir| {
        let secret_file = dir.join("azure-secret");
        std::fs::write(&secret_file, SECRET).unwrap();
        let extra = format!(
            "[prices]\nsnapshot = \"{snapshot}\"\n\
             [[residency]]\nname = \"us\"\nazure = [\"eastus\"]\n\
             [[site]]\nname = \"azure-eastus\"\nkind = \"azure\"\nregion = \"eastus\"\nresidency = \"us\"\n\
             instance_types = [\"{SIZE}\"]\n\
             [site.capacity]\nprovider = \"azure\"\nidle_timeout = \"1s\"\n\
             [site.capacity.azure]\nsubscription_id = \"{sub}\"\nresource_group = \"{group}\"\nimage = \"{image}\"\n\
             subnet_id = \"{subnet}\"\nssh_public_key = \"{key}\"\nendpoint = \"{endpoint}\"\nauthority = \"{endpoint}\"\n\
             ca_file = \"{ca}\"\n\
             [site.capacity.azure.credential]\nkind = \"client_secret\"\ntenant_id = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret_file = \"{secret}\"\n\
             [[dedicated]]\nagent = \"azure-eastus/*\"\ntenant = \"default\"\n",
            snapshot = snapshot.display(),
            sub = arm_for_setup.subscription_id,
            group = arm_for_setup.resource_group,
            image = arm_for_setup.image,
            subnet = arm_for_setup.subnet_id,
            key = arm_for_setup.ssh_public_key,
            endpoint = arm_for_setup.endpoint.clone().unwrap(),
            ca = arm_for_setup.ca_file.clone().unwrap().display(),
            secret = secret_file.display(),
        );
        Setup { broker_extra: Some(extra), broker_env: enrolling(dir, "1h"), ..Setup::default() }
    })
    .await;
    let cloud = CloudInit::new(&cluster.path("instances"));
    let watcher = tokio::spawn(watch(arm.clone(), cloud));
    let mut jobs = cluster.admin().await;
    let id = submit(&mut jobs, "name: big\ncommand: [\"echo\", \"on azure\"]\nresources: {gpus: 8}\n").await;
    let job = wait_job(&jobs, &id, "the job to succeed on an Azure VM", |j| j.state == "succeeded").await;
    let (site, vm) = job.agent.split_once('/').unwrap();
    assert_eq!(site, "azure-eastus");
    assert!(vm.starts_with("hbl-"), "the node is the VM's name, the launch id: {vm}");
    eventually("the idle VM to be deleted", || async { arm.vm_names().is_empty().then_some(()) }).await;
    watcher.abort();
}
