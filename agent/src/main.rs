//! `sockmesh`: parse the command line, set up logging, run the command.

use clap::Parser as _;

use sockmesh::cli::{Cli, LogFormat};
use tracing_subscriber::{EnvFilter, fmt};

/// jemalloc rather than glibc's malloc. Each wave of a churn soak (20,000
/// services replacing the last 20,000) briefly holds both; glibc kept that peak
/// resident in pages it could not return (RSS 147 → 203 MiB over ten waves, the
/// live heap flat), jemalloc's size-class slabs return it (79 → 92 MiB,
/// `SMBENCH_ONLY=soak cargo xtask bench`).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (`_RJEM_MALLOC_CONF` in the environment overrides them):
/// pages left free are returned to the kernel at once (decay 0) rather than
/// after 10 s; the soak's RSS after each wave was 156 → 253 MiB with the
/// default decay, 79 → 92 MiB with these, and the loads and writes no slower.
// SAFETY: jemalloc reads this symbol once, at its initialisation, as a
// NUL-terminated C string; the static is that string's first byte, immutable and
// alive for the whole process.
#[cfg(not(feature = "system-allocator"))]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &u8 = &b"background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0\0"[0];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    cli.command.execute()
}
