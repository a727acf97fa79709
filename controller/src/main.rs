use clap::{Parser, Subcommand};

/// dp: an eBPF dataplane that replaces kube-proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath in a throwaway namespace pair, send TCP and UDP
    /// through it, and show the counters and trace events it produced.
    Demo,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo => dp::demo::run(&mut std::io::stdout().lock()),
    }
}
