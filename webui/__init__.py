"""The web UI and JSON API (clipsearch serve): not built yet, see the open web UI issue."""
