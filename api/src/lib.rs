//! The vocabulary shared by the operator and the workers, with no client code,
//! so both binaries (and the e2e harness) can depend on it cheaply.

/// The API group of matchfleet's custom resources.
pub const API_GROUP: &str = "matchfleet.io";

/// The version of the custom resources this build serves.
pub const API_VERSION: &str = "v1alpha1";

/// Label keys every object the operator creates carries, so `kubectl get -l`
/// and the operator's own pruning find them.
pub mod labels {
    /// The app name: always `matchfleet`.
    pub const APP: &str = "app.kubernetes.io/name";
    /// The custom resource an object belongs to.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// Which part of the fleet an object is: `progress` or `worker`.
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    /// The manager that applied the object.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
}
