"""The common room: errors written for users, options and defaults, paths, what the commands share."""
