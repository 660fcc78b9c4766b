//! The GPT-2 byte-level BPE tokenizer, loaded from a Hugging Face model folder.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::TokenizerError;

/// GPT-2's end-of-text token, used when the files do not say otherwise.
const ENDOFTEXT: &str = "<|endoftext|>";
/// GPT-2's context length, used when no `config.json` says otherwise.
const DEFAULT_MODEL_MAX_LENGTH: u32 = 1024;

/// A loaded tokenizer plus the facts the services need about it. Immutable and cheap to share
/// behind an `Arc`.
///
/// ```
/// use llorch_tokenizer::BpeTokenizer;
///
/// let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
/// let tok = BpeTokenizer::from_dir(&dir)?;
/// let ids = tok.encode("Hello, world!", false)?;
/// assert_eq!(ids, [15496, 11, 995, 0]); // what Hugging Face's GPT2TokenizerFast gives
/// assert_eq!(tok.decode(&ids, false)?, "Hello, world!");
/// assert_eq!(tok.eos_token_id(), 50256);
/// // An id outside the vocabulary is an error, never a panic.
/// assert!(tok.decode(&[tok.vocab_size()], false).is_err());
/// # Ok::<(), llorch_tokenizer::TokenizerError>(())
/// ```
#[derive(Debug)]
pub struct BpeTokenizer {
    inner: Tokenizer,
    vocab_size: u32,
    eos_token_id: u32,
    model_max_length: u32,
}

impl BpeTokenizer {
    /// Loads the tokenizer of a Hugging Face model folder: `tokenizer.json` when present,
    /// otherwise `vocab.json` + `merges.txt` (the files of OpenAI's original release) with
    /// GPT-2's byte-level pre-tokenizer and decoder. `n_positions` from `config.json`, when the
    /// folder has one, becomes [`Self::model_max_length`].
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let inner = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| TokenizerError::Parse { path: json.clone(), reason: e.to_string() })?
        } else if vocab.is_file() && merges.is_file() {
            from_vocab_and_merges(&vocab, &merges)?
        } else {
            return Err(TokenizerError::NotFound(dir.to_path_buf()));
        };
        let model_max_length = read_n_positions(dir)?.unwrap_or(DEFAULT_MODEL_MAX_LENGTH);
        Self::new(inner, model_max_length)
    }

    fn new(inner: Tokenizer, model_max_length: u32) -> Result<Self, TokenizerError> {
        let vocab_size = u32::try_from(inner.get_vocab_size(true))
            .map_err(|_| TokenizerError::Library("vocabulary larger than u32".into()))?;
        let eos_token_id = inner.token_to_id(ENDOFTEXT).unwrap_or(vocab_size.saturating_sub(1));
        Ok(Self { inner, vocab_size, eos_token_id, model_max_length })
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_token_id(&self) -> u32 {
        self.eos_token_id
    }

    /// Longest sequence the model accepts (from `config.json`'s `n_positions`, else 1024).
    pub fn model_max_length(&self) -> u32 {
        self.model_max_length
    }

    /// Text to ids. `<|endoftext|>` inside the text becomes the special id, as in Hugging Face.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Library(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids to text; bytes that are not valid UTF-8 become U+FFFD. Every id must be in the
    /// vocabulary (the `tokenizers` library would silently drop unknown ones).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        self.decode_unchecked(ids, skip_special_tokens)
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Fails with the first id that is not below [`Self::vocab_size`].
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        match ids.iter().position(|&id| id >= self.vocab_size) {
            Some(position) => Err(TokenizerError::IdOutOfRange {
                id: ids[position],
                position,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }

    pub(crate) fn decode_unchecked(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Library(e.to_string()))
    }
}

/// Builds GPT-2's tokenizer from OpenAI's two files, configured as Hugging Face's
/// `GPT2TokenizerFast` is: byte-level pre-tokenizer without a prefix space, byte-level decoder,
/// `<|endoftext|>` special.
fn from_vocab_and_merges(vocab: &Path, merges: &Path) -> Result<Tokenizer, TokenizerError> {
    let parse_err = |e: tokenizers::Error| TokenizerError::Parse {
        path: vocab.to_path_buf(),
        reason: e.to_string(),
    };
    let vocab_str = vocab.to_str().ok_or_else(|| TokenizerError::NotFound(vocab.to_path_buf()))?;
    let merges_str =
        merges.to_str().ok_or_else(|| TokenizerError::NotFound(merges.to_path_buf()))?;
    let bpe = BPE::from_file(vocab_str, merges_str).build().map_err(parse_err)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer.add_special_tokens(&[AddedToken::from(ENDOFTEXT, true)]);
    Ok(tokenizer)
}

/// `n_positions` from the folder's `config.json`, if there is one.
fn read_n_positions(dir: &Path) -> Result<Option<u32>, TokenizerError> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TokenizerError::Parse { path: path.clone(), reason: e.to_string() })?;
    Ok(value
        .get("n_positions")
        .and_then(serde_json::Value::as_u64)
        .and_then(|n| u32::try_from(n).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default")
    }

    #[test]
    fn hello_world_has_the_known_ids() {
        let tok = BpeTokenizer::from_dir(&default_dir()).unwrap();
        assert_eq!(tok.encode("Hello, world!", false).unwrap(), [15496, 11, 995, 0]);
        assert_eq!(tok.encode("Hello.", false).unwrap(), [15496, 13]);
        assert_eq!(tok.vocab_size(), 50257);
        assert_eq!(tok.eos_token_id(), 50256);
    }

    #[test]
    fn vocab_and_merges_give_the_same_ids_as_tokenizer_json() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(default_dir().join(f), dir.join(f)).unwrap();
        }
        let from_json = BpeTokenizer::from_dir(&default_dir()).unwrap();
        let from_files = BpeTokenizer::from_dir(dir).unwrap();
        let text = "Hello, world! <|endoftext|> Ünïcödé 🦀  \r\n  x=1_000_000;";
        assert_eq!(from_files.encode(text, false).unwrap(), from_json.encode(text, false).unwrap());
        assert_eq!(from_files.vocab_size(), from_json.vocab_size());
        assert_eq!(from_files.eos_token_id(), 50256);
    }

    #[test]
    fn missing_files_name_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let err = BpeTokenizer::from_dir(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("no tokenizer in"), "{err}");
    }

    #[test]
    fn corrupt_tokenizer_json_is_a_parse_error() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("tokenizer.json"), b"{\"model\": 3").unwrap();
        let err = BpeTokenizer::from_dir(tmp.path()).unwrap_err();
        assert!(matches!(err, TokenizerError::Parse { .. }), "{err}");
    }

    #[test]
    fn decode_names_the_first_bad_id() {
        let tok = BpeTokenizer::from_dir(&default_dir()).unwrap();
        let err = tok.decode(&[15496, 50257, 99999], false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "token id 50257 at position 1 is out of range (vocab size 50257)"
        );
    }
}
