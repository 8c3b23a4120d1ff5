"""logpipe-relay: collect, verify, extract and file compressed logs from many servers."""
