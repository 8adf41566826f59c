//! The simulated users of a load run. Each user is drawn once from the seed
//! and keeps a segment, a profile, preferences and a "taste" vector for the
//! whole run, so re-requests look like the same person asking again.

use matchfleet_api::matching::{Preferences, Profile};
use rand::rngs::StdRng;
use rand::RngExt;

/// Youngest and oldest simulated user.
pub const MIN_AGE: u8 = 18;
pub const MAX_AGE: u8 = 60;

/// Per-request noise around a user's taste: small enough that a user's
/// requests stay close to each other, large enough that no two are equal.
const TASTE_NOISE: f64 = 0.15;

#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub id: String,
    pub segment: String,
    pub profile: Profile,
    pub wants: Preferences,
    /// Unit-length; every request of the user is this plus noise.
    pub taste: Vec<f32>,
}

impl User {
    /// A fresh unit vector near the user's taste for one request.
    pub fn request_vector(&self, rng: &mut StdRng) -> Vec<f32> {
        let noisy = self
            .taste
            .iter()
            .map(|t| f64::from(*t) + TASTE_NOISE * standard_normal(rng))
            .collect();
        normalised(noisy)
    }
}

/// What the population looks like.
#[derive(Clone, Debug)]
pub struct PopulationSpec {
    pub users: usize,
    pub segments: usize,
    /// Zipf exponent of segment sizes: 0 is uniform, 1 and above puts most
    /// users in the first few segments (like regions or languages do).
    pub skew: f64,
    pub dimension: usize,
}

/// Draws `spec.users` users; the same rng state gives the same users.
pub fn draw_population(spec: &PopulationSpec, rng: &mut StdRng) -> Vec<User> {
    let segments = Zipf::new(spec.segments, spec.skew);
    (0..spec.users)
        .map(|i| {
            let segment = format!("seg-{}", segments.sample(rng));
            let profile = Profile {
                gender: draw_gender(rng).to_string(),
                age: draw_age(rng),
            };
            let wants = draw_preferences(&profile, rng);
            let taste = normalised((0..spec.dimension).map(|_| standard_normal(rng)).collect());
            User {
                id: format!("user-{i:06}"),
                segment,
                profile,
                wants,
                taste,
            }
        })
        .collect()
}

/// Shares close to those dating apps publish: more men than women, a few
/// users outside the binary.
fn draw_gender(rng: &mut StdRng) -> &'static str {
    let u: f64 = rng.random();
    if u < 0.42 {
        "f"
    } else if u < 0.95 {
        "m"
    } else {
        "x"
    }
}

/// Skewed young: most users are in their twenties and thirties.
fn draw_age(rng: &mut StdRng) -> u8 {
    let u: f64 = rng.random();
    let span = f64::from(MAX_AGE - MIN_AGE + 1);
    let age = f64::from(MIN_AGE) + (span * u.powf(1.6)).floor();
    age.min(f64::from(MAX_AGE)) as u8
}

/// Mostly the opposite gender (or anyone), an age window around one's own age.
fn draw_preferences(profile: &Profile, rng: &mut StdRng) -> Preferences {
    let u: f64 = rng.random();
    let genders: &[&str] = match profile.gender.as_str() {
        "f" if u < 0.75 => &["m"],
        "m" if u < 0.75 => &["f"],
        "f" | "m" if u < 0.90 => &[],
        "f" => &["f"],
        "m" => &["m"],
        _ if u < 0.60 => &[],
        _ if u < 0.80 => &["f"],
        _ => &["m"],
    };
    let (min_age, max_age) = if rng.random_bool(0.1) {
        (MIN_AGE, 99)
    } else {
        (
            profile
                .age
                .saturating_sub(rng.random_range(2..=8))
                .max(MIN_AGE),
            profile.age.saturating_add(rng.random_range(2..=10)).min(99),
        )
    };
    Preferences {
        genders: genders.iter().map(|g| g.to_string()).collect(),
        min_age,
        max_age,
    }
}

/// Picks 0..n with probability proportional to 1 / (k + 1)^exponent.
#[derive(Clone, Debug)]
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    /// `n` of 0 is treated as 1: there is always at least one outcome.
    pub fn new(n: usize, exponent: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n.max(1))
            .map(|k| {
                total += 1.0 / (k as f64).powf(exponent);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    pub fn sample(&self, rng: &mut StdRng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let target = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|c| *c <= target)
            .min(self.cumulative.len() - 1)
    }
}

/// Box-Muller: one standard normal value from two uniforms.
fn standard_normal(rng: &mut StdRng) -> f64 {
    // 1 - [0, 1) is (0, 1]: keeps ln away from zero.
    let u1 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Scales to unit length; a zero vector (vanishingly unlikely) becomes the first axis.
fn normalised(v: Vec<f64>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        v.iter().map(|x| (x / norm) as f32).collect()
    } else {
        (0..v.len())
            .map(|i| if i == 0 { 1.0 } else { 0.0 })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn spec() -> PopulationSpec {
        PopulationSpec {
            users: 2000,
            segments: 8,
            skew: 1.1,
            dimension: 16,
        }
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn the_same_seed_draws_the_same_people() {
        let a = draw_population(&spec(), &mut StdRng::seed_from_u64(7));
        let b = draw_population(&spec(), &mut StdRng::seed_from_u64(7));
        let c = draw_population(&spec(), &mut StdRng::seed_from_u64(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn profiles_and_preferences_are_plausible() {
        let users = draw_population(&spec(), &mut StdRng::seed_from_u64(1));
        let count = |f: &dyn Fn(&User) -> bool| users.iter().filter(|u| f(u)).count();
        for u in &users {
            assert!((MIN_AGE..=MAX_AGE).contains(&u.profile.age), "{u:?}");
            assert!(u.wants.min_age <= u.wants.max_age, "{u:?}");
            assert!(u.wants.min_age <= u.profile.age && u.profile.age <= u.wants.max_age);
        }
        let women = count(&|u| u.profile.gender == "f");
        let men = count(&|u| u.profile.gender == "m");
        let others = count(&|u| u.profile.gender == "x");
        assert!(
            men > women && women > others && others > 0,
            "{women} {men} {others}"
        );
        let straight_women = count(&|u| u.profile.gender == "f" && u.wants.genders == ["m"]);
        assert!(straight_women * 2 > women, "mostly the opposite gender");
        let under_40 = count(&|u| u.profile.age < 40);
        // Uniform ages would put 51% under 40; the skew puts about 66% there.
        assert!(
            under_40 * 100 > users.len() * 58,
            "skewed young: {under_40}"
        );
    }

    #[test]
    fn segments_are_skewed_towards_the_first() {
        let users = draw_population(&spec(), &mut StdRng::seed_from_u64(2));
        let in_segment = |s: &str| users.iter().filter(|u| u.segment == s).count();
        assert!(in_segment("seg-0") > 3 * in_segment("seg-7"));
        assert!(in_segment("seg-7") > 0, "every segment has someone");
        let flat = PopulationSpec {
            skew: 0.0,
            ..spec()
        };
        let users = draw_population(&flat, &mut StdRng::seed_from_u64(2));
        let in_segment = |s: &str| users.iter().filter(|u| u.segment == s).count();
        assert!(
            in_segment("seg-0") < 2 * in_segment("seg-7"),
            "skew 0 is uniform"
        );
    }

    #[test]
    fn a_users_requests_stay_close_to_their_taste() {
        let mut rng = StdRng::seed_from_u64(3);
        let users = draw_population(&spec(), &mut rng);
        let (a, b) = (&users[0], &users[1]);
        let a1 = a.request_vector(&mut rng);
        let a2 = a.request_vector(&mut rng);
        let b1 = b.request_vector(&mut rng);
        for v in [&a1, &a2, &b1, &a.taste] {
            assert_eq!(v.len(), 16);
            assert!((cosine(v, v) - 1.0).abs() < 1e-4, "unit length");
        }
        assert_ne!(a1, a2, "noise per request");
        assert!(cosine(&a1, &a2) > 0.7, "{}", cosine(&a1, &a2));
        assert!(cosine(&a1, &a2) > cosine(&a1, &b1));
    }

    #[test]
    fn zipf_covers_every_outcome_and_nothing_else() {
        let mut rng = StdRng::seed_from_u64(4);
        let zipf = Zipf::new(3, 1.0);
        let mut seen = [0usize; 3];
        for _ in 0..6000 {
            seen[zipf.sample(&mut rng)] += 1;
        }
        // Expected shares 6/11, 3/11, 2/11.
        assert!(seen[0] > seen[1] && seen[1] > seen[2], "{seen:?}");
        assert!((2900..3600).contains(&seen[0]), "{seen:?}");
        let one = Zipf::new(0, 2.0);
        assert!((0..100).all(|_| one.sample(&mut rng) == 0));
    }
}
