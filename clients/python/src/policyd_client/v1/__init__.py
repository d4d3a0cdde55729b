"""Generated from proto/policyd/v1 by scripts/gen_proto.py: do not edit."""
