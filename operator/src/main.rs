//! nodegate-operator binary. The controller that runs the compiler against a cluster is the
//! next milestone; until then the binary only explains itself, so nobody deploys a no-op.

use clap::Parser;

/// Reconciles NodeApiPolicy objects into ClusterRoles, ClusterRoleBindings, ServiceAccounts and
/// one NodeAgentConfig per node.
#[derive(Parser)]
#[command(name = "nodegate-operator", version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    Cli::parse();
    anyhow::bail!(
        "the nodegate-operator controller is not built yet: this release ships the API \
         (CRDs) and the policy compiler only"
    )
}
