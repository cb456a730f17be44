//! `pgquorum monitor ...`.

#[derive(clap::Args)]
pub struct MonitorArgs {}

pub fn run(_args: MonitorArgs) -> anyhow::Result<()> {
    anyhow::bail!("`pgquorum monitor` is not built yet")
}
