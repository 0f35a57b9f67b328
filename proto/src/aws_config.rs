//! The AWS shared credentials and config files (`~/.aws/credentials`, `~/.aws/config`): INI
//! text of `[section]` headers and `key = value` lines, as the AWS CLI and SDKs read them.
//! Only what a repository on S3 needs: one profile's plain values.

use std::collections::BTreeMap;

/// The keys and values of section `section` (for example `default`, or `profile name` in
/// the config file). Keys are lowercased; later duplicates win; comment lines (`#`, `;`),
/// blank lines, continuation lines and anything malformed are ignored, as the AWS tools do.
pub fn section(text: &str, section: &str) -> BTreeMap<String, String> {
    let mut values = BTreeMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            inside = name
                .split_once(']')
                .is_some_and(|(name, _)| squeeze(name) == squeeze(section));
            continue;
        }
        if !inside {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && !key.contains(char::is_whitespace) {
                values.insert(key.to_ascii_lowercase(), value.trim().to_owned());
            }
        }
    }
    values
}

/// Section names compare with runs of blanks as one space (`[profile  x]` is `profile x`).
fn squeeze(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_profile() {
        let text = "# comment\n[default]\naws_access_key_id = AKIA1\nAWS_Secret_Access_Key=s1\n\n\
                    [profile backup]\nregion = eu-west-1\n[backup]\naws_access_key_id=AKIA2\n\
                    ; note\n  aws_secret_access_key =  s2  \nbroken line\n[unterminated\nx=y\n";
        let d = section(text, "default");
        assert_eq!(d["aws_access_key_id"], "AKIA1");
        assert_eq!(d["aws_secret_access_key"], "s1");
        assert_eq!(d.len(), 2);
        assert_eq!(section(text, "profile  backup")["region"], "eu-west-1");
        let b = section(text, "backup");
        assert_eq!(b["aws_secret_access_key"], "s2");
        assert_eq!(b.len(), 2);
        assert!(section(text, "nothing").is_empty());
        assert!(section("", "default").is_empty());
    }
}
