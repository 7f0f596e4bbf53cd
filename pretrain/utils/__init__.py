"""Small shared utilities (config loading, logging) used by both `pretrain` and `curation`."""
