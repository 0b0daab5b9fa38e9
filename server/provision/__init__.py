"""Provisioners: where proxies' instances run (local child processes by default; a
Kubernetes Deployment per proxy for those who outgrow one machine)."""
