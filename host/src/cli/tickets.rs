//! `tern tickets`: the session-ticket keys a fleet shares through Redis, shown or rotated.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use tern::config::Config;

#[derive(Debug, Subcommand)]
pub enum TicketsCommand {
    /// Show the ticket-key slots every node accepts now: generation, maker, age, activation. No key bytes.
    Status {
        /// Config file of any node of the fleet (its [resumption] and [[redis]] sections are used).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Force a rotation: a new key for the current slot, used by every node after --lead (they pull it first);
    /// tickets under older keys keep resuming for the ticket lifetime.
    Rotate {
        /// Config file of any node of the fleet.
        #[arg(short, long)]
        config: PathBuf,
        /// How long nodes get to pull the key before encrypting with it.
        #[arg(long, default_value = "2s")]
        lead: String,
    },
}

/// Runs `tern tickets status` or `tern tickets rotate`.
pub async fn run(command: TicketsCommand) -> Result<()> {
    let (path, lead) = match &command {
        TicketsCommand::Status { config } => (config, None),
        TicketsCommand::Rotate { config, lead } => {
            (config, Some(tern::config::parse_duration(lead).map_err(|e| anyhow::anyhow!("--lead: {e}"))?))
        }
    };
    let config = Config::load(path)?;
    let settings = &config.resumption;
    let Some(store_name) = &settings.store else {
        bail!("{}: [resumption] has no redis store: ticket keys are local to each node", path.display())
    };
    let stores = tern::server::stores_for(&config);
    let store = stores.get(store_name).cloned().context("the [resumption] store is not defined")?;
    let (keys, schedule) = tern::resumption::fleet_keys(settings, store).context("[resumption] has no secret")?;
    let now = tern::resumption::now_ms();
    let age = |ms: u64| {
        let secs = (now as i64 - ms as i64) / 1000;
        if secs >= 0 { format!("{secs}s ago") } else { format!("in {}s", -secs) }
    };
    if let Some(lead) = lead {
        let key = keys.rotate(&schedule, &format!("{}-cli", settings.node), lead).await?;
        println!(
            "rotated: slot {} generation {}, encrypting on every node {}",
            key.slot,
            key.generation,
            age(key.activate_ms)
        );
        return Ok(());
    }
    let current = schedule.slot_at(now);
    println!(
        "rotation every {:?}, tickets live {:?}: {} previous slot(s) + current + next accepted",
        settings.ticket_rotation, settings.ticket_lifetime, schedule.window
    );
    println!("{:>12} {:>4} {:>10}  {:<28} {:<14} {:<14} secret", "slot", "gen", "", "made by", "made", "active");
    let status = keys.status(&schedule).await?;
    for slot in schedule.accepted(now) {
        let label = match slot.cmp(&current) {
            std::cmp::Ordering::Less => "previous",
            std::cmp::Ordering::Equal => "CURRENT",
            std::cmp::Ordering::Greater => "next",
        };
        let mut any = false;
        for key in status.iter().filter(|k| k.slot == slot) {
            any = true;
            println!(
                "{:>12} {:>4} {:>10}  {:<28} {:<14} {:<14} {}",
                slot,
                key.generation,
                label,
                key.node,
                age(key.created_ms),
                age(key.activate_ms),
                if key.opens { "opens" } else { "DIFFERENT SECRET" }
            );
        }
        if !any {
            println!("{slot:>12} {:>4} {label:>10}  (no key yet)", "-");
        }
    }
    Ok(())
}
