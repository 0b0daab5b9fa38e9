"""Tunnels' repositories: tunnels with their endpoints, shares and share links, agents'
sessions with their counted reports and usage."""
