//! XenServer simulator (work in progress).
