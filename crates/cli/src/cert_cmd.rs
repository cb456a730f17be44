//! `pgquorum cert ...`: the CA and the certificates it issues (see docs/security.md).

use anyhow::Context;
use pgquorum_trust::{CertsDir, ClientRole, Identity, Validity};

use crate::trust_args::TrustArgs;

#[derive(clap::Args)]
pub struct CertArgs {
    #[command(subcommand)]
    command: CertCommand,
    /// Set from the global --json.
    #[arg(skip)]
    pub json: bool,
}

#[derive(clap::Subcommand)]
enum CertCommand {
    /// Create the CA (ca.crt, and ca.key, which stays where certificates are issued).
    CreateCa {
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA (every certificate it issued stops working).
        #[arg(long)]
        overwrite: bool,
    },
    /// Certificate of monitor member N, valid for the names and addresses others dial.
    /// Example: `pgquorum cert create-member --id 1 --host 10.0.0.1 --host m1.example`.
    CreateMember {
        /// The member's --node-id.
        #[arg(long)]
        id: u64,
        /// A host name or IP address the member is reached at (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace existing files (renewal; running processes pick them up).
        #[arg(long)]
        overwrite: bool,
    },
    /// Certificate of the keeper of node NAME, valid for the names and addresses its
    /// PostgreSQL is reached at. Example: `pgquorum cert create-keeper --name pg1 --host 10.0.0.11`.
    CreateKeeper {
        /// The node's --name.
        #[arg(long)]
        name: String,
        /// A host name or IP address of the node (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace existing files (renewal; running processes pick them up).
        #[arg(long)]
        overwrite: bool,
    },
    /// Certificate of a person or tool. Example: `pgquorum cert create-client --name alice --role operator`.
    CreateClient {
        /// The client's name (used with --client NAME).
        #[arg(long)]
        name: String,
        /// operator (may change the cluster) or viewer (may only read).
        #[arg(long)]
        role: ClientRoleArg,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace existing files (renewal; running processes pick them up).
        #[arg(long)]
        overwrite: bool,
    },
    /// Every certificate in the directory: who, role, hosts, expiry.
    List,
    /// Revoke a certificate (adds it to ca.crl; members and keepers reload it).
    /// Example: `pgquorum cert revoke client.alice`.
    Revoke {
        /// member.N, keeper.NAME or client.NAME.
        which: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ClientRoleArg {
    Operator,
    Viewer,
}

fn identity_of_stem(dir: &CertsDir, which: &str) -> anyhow::Result<Identity> {
    let path = dir.path.join(format!("{which}.crt"));
    let pem = std::fs::read_to_string(&path)
        .with_context(|| format!("no certificate {}", path.display()))?;
    let der = pgquorum_trust::certs::pem_der(&path, &pem, "CERTIFICATE")?;
    Ok(Identity::from_der(&der)?)
}

pub fn run(args: CertArgs, trust: &TrustArgs) -> anyhow::Result<()> {
    let dir = CertsDir::new(trust.dir()?);
    let created = match args.command {
        CertCommand::CreateCa { days, overwrite } => {
            Some(dir.create_ca(Validity::days(days), overwrite)?)
        }
        CertCommand::CreateMember {
            id,
            hosts,
            days,
            overwrite,
        } => {
            if id == 0 {
                anyhow::bail!("--id must be a positive integer (the member's --node-id)");
            }
            Some(dir.create(
                &Identity::Member(id),
                &hosts,
                Validity::days(days),
                overwrite,
            )?)
        }
        CertCommand::CreateKeeper {
            name,
            hosts,
            days,
            overwrite,
        } => Some(dir.create(
            &Identity::keeper(&name)?,
            &hosts,
            Validity::days(days),
            overwrite,
        )?),
        CertCommand::CreateClient {
            name,
            role,
            days,
            overwrite,
        } => {
            let role = match role {
                ClientRoleArg::Operator => ClientRole::Operator,
                ClientRoleArg::Viewer => ClientRole::Viewer,
            };
            Some(dir.create(
                &Identity::client(role, &name)?,
                &[],
                Validity::days(days),
                overwrite,
            )?)
        }
        CertCommand::List => {
            let list = dir.list()?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<24} {:<9} {:<22} {:<28} {:<32} STATUS",
                    "FILE", "ROLE", "IDENTITY", "HOSTS", "EXPIRES"
                );
                for c in list {
                    let status = match (c.revoked, c.expired) {
                        (true, _) => "revoked",
                        (_, true) => "expired",
                        _ => "valid",
                    };
                    println!(
                        "{:<24} {:<9} {:<22} {:<28} {:<32} {status}",
                        c.file,
                        c.role,
                        c.identity.unwrap_or_else(|| "-".into()),
                        if c.hosts.is_empty() {
                            "-".into()
                        } else {
                            c.hosts.join(",")
                        },
                        c.expires
                    );
                }
            }
            None
        }
        CertCommand::Revoke { which } => {
            let id = identity_of_stem(&dir, &which)?;
            let serial = dir.revoke(&id)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"revoked": id.role_name(), "serial": serial})
                );
            } else {
                println!("revoked {id} (serial {serial}); members and keepers refuse it once they reload (within 5 s, or at once on SIGHUP)");
            }
            None
        }
    };
    if let Some(path) = created {
        if args.json {
            println!("{}", serde_json::json!({"created": path}));
        } else {
            println!("created {} (key beside it, mode 0600)", path.display());
        }
    }
    Ok(())
}
