"""Study specs shipped with ovss-tune (YAML files beside this module)."""
