//! The render command template. Placeholders are replaced in one pass per
//! argument, so a value that itself contains `{...}` is never expanded again,
//! and the command runs without a shell: no quoting, no injection.

/// The per-task values a command can refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vars<'a> {
    pub key: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub attempt: u32,
    pub value_file: &'a str,
    pub output: &'a str,
    pub slot: &'a str,
    pub epoch: u64,
}

impl Vars<'_> {
    fn lookup(&self, name: &str) -> Option<String> {
        Some(match name {
            "key" => self.key.to_string(),
            "partition" => self.partition.to_string(),
            "offset" => self.offset.to_string(),
            "attempt" => self.attempt.to_string(),
            "value_file" => self.value_file.to_string(),
            "output" => self.output.to_string(),
            "slot" => self.slot.to_string(),
            "epoch" => self.epoch.to_string(),
            _ => return None,
        })
    }
}

/// Expands every argument. Unknown `{names}` are left as they are, so a
/// command may still contain braces (for example shell or JSON).
pub fn expand(command: &[String], vars: &Vars) -> Vec<String> {
    command.iter().map(|arg| expand_one(arg, vars)).collect()
}

fn expand_one(arg: &str, vars: &Vars) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => match vars.lookup(&after[..close]) {
                Some(value) => {
                    out.push_str(&value);
                    rest = &after[close + 1..];
                }
                None => {
                    out.push('{');
                    rest = after;
                }
            },
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(key: &'a str) -> Vars<'a> {
        Vars {
            key,
            partition: 3,
            offset: 42,
            attempt: 2,
            value_file: "/tmp/v",
            output: "/out/.staging/k",
            slot: "demo-live-blue-0",
            epoch: 7,
        }
    }

    #[test]
    fn placeholders_are_replaced() {
        let cmd: Vec<String> = [
            "sh",
            "-c",
            "render {key} {value_file} > {output}",
            "{partition}:{offset}:{attempt}:{slot}:{epoch}",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            expand(&cmd, &vars("u1")),
            vec![
                "sh",
                "-c",
                "render u1 /tmp/v > /out/.staging/k",
                "3:42:2:demo-live-blue-0:7"
            ]
        );
    }

    #[test]
    fn values_are_not_expanded_twice_and_unknown_braces_stay() {
        let cmd = vec!["{key}-{nope}-{".to_string(), "{}".to_string()];
        assert_eq!(
            expand(&cmd, &vars("{output}")),
            vec!["{output}-{nope}-{", "{}"]
        );
    }
}
