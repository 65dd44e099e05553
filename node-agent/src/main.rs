//! nodegate-agent binary. The request pipeline (listeners, authentication, authorization,
//! upstream proxy, filters) is the next milestone; until then the binary only explains itself.

use clap::Parser;

/// Serves the kubelet API on a node: authenticates, authorizes by NodeApiPolicy, proxies to the
/// kubelet and filters responses to the caller's namespaces.
#[derive(Parser)]
#[command(name = "nodegate-agent", version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    Cli::parse();
    anyhow::bail!("the nodegate-agent request pipeline is not built yet")
}
