"""The fuzz suite (tests/v1/test_fuzz.py): what it knows of the service and how it
judges an answer (service), the wire format written by hand (wire), the Fuzzer that
sends batches and checks every answer (harness), valid requests to start from (valid),
and what it sends: raw bytes and field soup (raw), mutations of valid requests
(mutations), hostile values in well-formed messages (hostile), malformed streams
(streams), and what fuzzing found, pinned (found)."""
