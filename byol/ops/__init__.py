"""Native code of the project: its sources and the script that builds them."""
