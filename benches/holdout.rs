//! Treatment-vs-holdout: how soon the always-valid mSPRT proves a 10% drop, how often it cries
//! wolf under continuous looking, and how that compares with a fixed-horizon z-test and with the
//! information-theoretic minimum.
//!
//! `cargo bench --bench holdout [-- --runs N]` prints a markdown table for the README.

use guardrail::seqtest::{markdown_table, run_report, HoldoutSim};
use std::time::Instant;

fn runs_from_args() -> usize {
    let args: Vec<String> = std::env::args().collect();
    let mut runs = 10_000;
    for (i, a) in args.iter().enumerate() {
        let value = if a == "--runs" {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix("--runs=")
        };
        if let Some(n) = value.and_then(|v| v.parse().ok()) {
            runs = n;
        }
    }
    runs
}

fn main() {
    let runs = runs_from_args();
    let base = HoldoutSim {
        base_rate: 0.05,
        relative_effect: -0.10,
        holdout_fraction: 0.10,
        sessions_per_look: 1_000,
        max_sessions: 2_000_000,
        alpha: 0.05,
        tau_rel: 0.10,
    };
    println!(
        "holdout: conversion {}%, treatment {:+.0}%, holdout {}% of sessions, a look every {} \
         sessions up to {}, tau_rel {}, {runs} runs per cell",
        base.base_rate * 100.0,
        base.relative_effect * 100.0,
        base.holdout_fraction * 100.0,
        base.sessions_per_look,
        base.max_sessions,
        base.tau_rel,
    );
    let start = Instant::now();
    let reports: Vec<_> = [0.05, 0.01]
        .into_iter()
        .map(|alpha| run_report(&HoldoutSim { alpha, ..base }, runs, 20_261_122))
        .collect();
    println!();
    print!("{}", markdown_table(&reports));
    println!();
    for r in &reports {
        println!(
            "alpha {}: null false-alarm rate {:.2}% ± {:.2}% over {} runs of {} looks \
             (bound {}%); KL {:.3e} nats/session",
            r.sim.alpha,
            r.false_alarm_rate * 100.0,
            r.false_alarm_se * 100.0,
            r.runs,
            r.sim.max_sessions / r.sim.sessions_per_look,
            r.sim.alpha * 100.0,
            r.kl_per_session,
        );
    }
    println!("elapsed {:.1} s", start.elapsed().as_secs_f64());
}
