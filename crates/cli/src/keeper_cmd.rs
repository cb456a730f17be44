//! `pgquorum keeper ...`.

#[derive(clap::Args)]
pub struct KeeperArgs {}

pub fn run(_args: KeeperArgs) -> anyhow::Result<()> {
    anyhow::bail!("`pgquorum keeper` is not built yet")
}
