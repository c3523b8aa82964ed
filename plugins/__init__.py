"""The gateway's built-in plugins. Each sub-package registers through the ``gateway`` entry-point
group exactly as a third-party plugin would; the host never imports them by name."""
