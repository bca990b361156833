use super::*;

#[test]
fn basic_encodings_differ_only_for_special_characters() {
    let raw = basic_credentials("id", "a-b_c.d", BasicEncoding::Raw);
    assert_eq!(
        raw,
        basic_credentials("id", "a-b_c.d", BasicEncoding::FormEncoded)
    );
    assert_eq!(
        raw,
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("id:a-b_c.d")
        )
    );
    assert_ne!(
        basic_credentials("id", "a+b/c=", BasicEncoding::Raw),
        basic_credentials("id", "a+b/c=", BasicEncoding::FormEncoded)
    );
}
