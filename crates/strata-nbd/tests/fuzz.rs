//! Fuzz-style property tests: the codec's decoders take untrusted bytes and must return an
//! error, never panic; what the encoders produce must decode back.

use proptest::prelude::*;
use strata_nbd::proto::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), kind in any::<u16>()) {
        let _ = decode_greeting(&bytes);
        let _ = decode_option_header(&bytes);
        let _ = decode_option_reply_header(&bytes);
        let _ = decode_info_request(&bytes);
        let _ = decode_info(&bytes);
        let _ = decode_rep_server(&bytes);
        let _ = decode_meta_context_request(&bytes);
        let _ = decode_rep_meta_context(&bytes);
        let _ = decode_request(&bytes, false);
        let _ = decode_request(&bytes, true);
        let _ = decode_reply_header(&bytes);
        let _ = decode_hole(&bytes);
        let _ = decode_error_chunk(kind, &bytes);
        let _ = decode_error_chunk(REPLY_TYPE_ERROR_OFFSET, &bytes);
        let _ = decode_block_status(kind, &bytes);
        let _ = decode_block_status(REPLY_TYPE_BLOCK_STATUS, &bytes);
        let _ = decode_block_status(REPLY_TYPE_BLOCK_STATUS_EXT, &bytes);
        let _ = decode_block_status_payload(&bytes);
        if bytes.len() >= 4 {
            let _ = reply_header_len(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
        }
    }

    /// Valid prefixes followed by random tails: the decoders must get past the magic and
    /// then cope with whatever follows.
    #[test]
    fn decoders_with_valid_magic_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        for magic in [REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
                      STRUCTURED_REPLY_MAGIC, EXTENDED_REPLY_MAGIC] {
            let mut b = magic.to_be_bytes().to_vec();
            b.extend_from_slice(&tail);
            let _ = decode_request(&b, magic == EXTENDED_REQUEST_MAGIC);
            let _ = decode_reply_header(&b);
        }
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&tail);
        let _ = decode_option_header(&b);
        let mut b = REP_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&tail);
        let _ = decode_option_reply_header(&b);
        // Length-prefixed strings with lying lengths.
        let mut b = (tail.len() as u32 + 7).to_be_bytes().to_vec();
        b.extend_from_slice(&tail);
        let _ = decode_meta_context_request(&b);
        let _ = decode_info_request(&b);
        let _ = decode_rep_server(&b);
    }

    #[test]
    fn requests_roundtrip(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(),
                          offset in any::<u64>(), len in any::<u32>(), ext in any::<bool>()) {
        let r = Request { flags, kind, cookie, offset, len: len.into() };
        let b = encode_request(&r, ext).unwrap();
        prop_assert_eq!(decode_request(&b, ext).unwrap(), r);
    }

    #[test]
    fn meta_context_requests_roundtrip(export in "[a-z0-9:-]{0,20}",
                                       queries in proptest::collection::vec("[a-z:-]{0,30}", 0..8)) {
        let r = MetaContextRequest { export, queries };
        prop_assert_eq!(decode_meta_context_request(&encode_meta_context_request(&r)).unwrap(), r);
    }

    #[test]
    fn block_status_roundtrip(ds in proptest::collection::vec((1u64..u32::MAX as u64, 0u64..4), 1..50),
                              id in any::<u32>()) {
        let ds: Vec<Descriptor> = ds.into_iter().map(|(len, flags)| Descriptor { len, flags }).collect();
        for (ext, kind) in [(false, REPLY_TYPE_BLOCK_STATUS), (true, REPLY_TYPE_BLOCK_STATUS_EXT)] {
            let p = encode_block_status(id, &ds, ext).unwrap();
            prop_assert_eq!(decode_block_status(kind, &p).unwrap(), (id, ds.clone()));
        }
    }

    #[test]
    fn error_chunks_roundtrip(errno in 1u32.., msg in ".{0,100}", off in proptest::option::of(any::<u64>())) {
        let kind = if off.is_some() { REPLY_TYPE_ERROR_OFFSET } else { REPLY_TYPE_ERROR };
        let p = encode_error_chunk(errno, &msg, off);
        prop_assert_eq!(decode_error_chunk(kind, &p).unwrap(), (errno, msg, off));
    }
}
