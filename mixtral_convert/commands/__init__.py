"""One module per command: split (split and split-sparse), merge, verify, inspect, concat;
`common` holds what the writing commands share."""
