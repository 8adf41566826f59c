//! The matchfleet worker. Its modes (progress, render, match) land with the
//! RenderJob and MatchPipeline issues; today it reports its version and exits.

fn main() {
    println!(
        "matchfleet-worker {} ({}): no mode is built yet",
        env!("CARGO_PKG_VERSION"),
        matchfleet_api::API_GROUP
    );
}
