"""Where notices go: operators' webhook URLs and email addresses, users' email."""
