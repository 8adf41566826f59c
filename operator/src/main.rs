//! The matchfleet operator. Its reconcilers land with the RenderJob and
//! MatchPipeline issues; today it reports what it serves and exits.

fn main() {
    println!(
        "matchfleet-operator {} ({}/{}): no reconciler is built yet",
        env!("CARGO_PKG_VERSION"),
        matchfleet_api::API_GROUP,
        matchfleet_api::API_VERSION
    );
}
