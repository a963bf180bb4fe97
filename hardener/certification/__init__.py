"""Certification: randomized smoothing (`smoothing`: CERTIFY, the sequential test, PREDICT) and one certification run for
`hardener.certify` and `harden certify` alike (`run`)."""
