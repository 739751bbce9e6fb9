"""The room service: rooms (group conversations), members and roles, invitations."""
